"""How the process computes, apart from what it computes: the CPU kernel that runs a pass's
Linear layers and the proxy's precision (:mod:`.kernels`), and process-wide settings for long
runs (:mod:`.process`: malloc keeps freed memory, workers die with their parent)."""
