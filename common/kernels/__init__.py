"""specd's own CPU kernels, compiled on first use (torch.utils.cpp_extension) and cached per machine."""
