from ledgerctl.entry import main

main()
