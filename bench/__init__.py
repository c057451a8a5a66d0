"""llavao1_bench: latency, memory and accuracy across quantization levels and search settings."""
