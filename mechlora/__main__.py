from mechlora.cli import main

main()
