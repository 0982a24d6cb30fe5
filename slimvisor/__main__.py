from slimvisor.cli import main

main()
