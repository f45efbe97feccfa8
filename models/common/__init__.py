"""Building blocks shared by the Qwen-VL ports: layers, the decoder, typed weights generated
from the parameter table, and table-driven checkpoint I/O."""
