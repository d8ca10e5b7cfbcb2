from vlp_bench.cli import main

if __name__ == "__main__":  # a spawned process (side-by-side pre-training) imports this module without running it
    main()
