from omlx.cli import main

# Guarded: a worker process started with "spawn" (omlx.api.offload) imports this module
# again and must not start a second server.
if __name__ == "__main__":
    main()
