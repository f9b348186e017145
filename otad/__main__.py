from otad.cli import main

main()
