from quanta.entry import main

main()
