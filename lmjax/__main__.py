from lmjax.cli import main

main()
