import { signIn } from "../api.js";
import { clear, h, message } from "../dom.js";

export async function render(main) {
  const status = h("div", { class: "form-status" });
  const user = h("input", { id: "login-username", name: "username", autocomplete: "username", required: true, autofocus: true });
  const pass = h("input", { id: "login-password", name: "password", type: "password", autocomplete: "current-password", required: true });
  const button = h("button", { class: "btn btn-primary", type: "submit" }, "Sign in");
  const form = h("form", { class: "login-form", onsubmit: async (ev) => {
    ev.preventDefault();
    button.disabled = true;
    clear(status);
    try {
      await signIn(user.value, pass.value);
      const next = sessionStorage.getItem("quanta.explorer.after-login") || "#/";  // the role's home
      sessionStorage.removeItem("quanta.explorer.after-login");
      location.hash = next;
    } catch (e) {
      clear(status, message("error", e.message));
      button.disabled = false;
      pass.select();
    }
  } },
  h("h1", {}, "Sign in"),
  h("p", { class: "muted" }, "Ask your estate a question and get answers from every online device in seconds."),
  h("label", { for: "login-username" }, "Username"), user,
  h("label", { for: "login-password" }, "Password"), pass,
  status, button);
  clear(main, h("section", { class: "login card" }, form));
  user.focus();
}
