"""GPU kernels (CuPy raw kernels) with a torch reference beside each, and a dispatcher."""
