from vlp_bench.cli import main

main()
