"""Building blocks shared by the Qwen-VL ports: layers and table-driven checkpoint I/O."""
