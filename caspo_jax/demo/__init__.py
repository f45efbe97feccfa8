"""The built-in synthetic multimodal safety task (see task.py); `caspo demo` runs it (`caspo_jax.loop.demo`)."""

from caspo_jax.demo.task import DEMO_CONSTITUTIONS, demo_reward, draw_image, make_split, target_response, write_split

__all__ = ["DEMO_CONSTITUTIONS", "demo_reward", "draw_image", "make_split", "target_response", "write_split"]
