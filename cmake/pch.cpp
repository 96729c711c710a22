// Translation unit that carries the precompiled LibTorch header for the repository programs.
