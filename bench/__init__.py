"""zsad-bench: latency / FPS / VRAM per model x backend x precision x batch (arrives with the bench issue)."""
