from sandkeep.cli.main import main

main()
