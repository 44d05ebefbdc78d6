"""Hand-written kernels that XLA calls as FFI custom calls where its own code is slow: `amx` (bfloat16 matrix
products and fused attention on Intel AMX tiles). Each says when it is used and falls back to XLA's own operation otherwise."""
