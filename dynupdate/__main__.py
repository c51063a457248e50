from dynupdate.cli import main

main()
