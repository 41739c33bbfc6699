"""Protocol modules: each one registers its state functions with the afpa runtime."""
