from quanta.db import tables
from quanta.db.migrations.common_env import run

run(tables.master)
