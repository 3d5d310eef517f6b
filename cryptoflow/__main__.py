from cryptoflow.cli import main

main()
