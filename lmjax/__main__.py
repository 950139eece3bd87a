from lmjax.commands import main

main()
