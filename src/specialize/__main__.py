from specialize.cli import main

main()
