"""Hand-written kernels that XLA calls as FFI custom calls where its own code is slow: `amx` (bfloat16 matrix
products and fused attention on Intel AMX tiles), `attention` (fused float32 attention on the CPU's vector units)
and `pairwise` (the Bradley–Terry loss and its derivatives in one pass), all built by `native` with the system C++
compiler on first use. Each says when it is used and falls back to XLA's own operations otherwise."""
