"""What every part of the project may use, torch-free and with no effect on import: `runtime`
(CPU threads, the allocator, memory), `privacy` (what may be shared: paths relative to ~, URLs
without credentials), `metrics` (PSNR, uint8), `startup` (imported first by each entry point: the
OpenMP waits set before numpy and torch start their thread pools; the only module with an effect).
"""
