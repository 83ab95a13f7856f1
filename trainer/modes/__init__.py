"""The training modes. Each mode is declared here once, as a :class:`~trainer.modes.registry.Mode`
(what the config checks, preflight, memory estimate, page and job ask about it); its task code
lives in the module the descriptor names (``lora.py``, ``ileco.py``, ``difference.py``,
``addift.py``, ``multi_addift.py``). The declarations stay in this light module because the task
modules import torch, and the config and the page ask the registry before torch is loaded.
"""

from trainer.modes.registry import Mode, Need, all_modes, get_mode, register_mode

_FOLDER = Need("lora_data_directory", "lora_data_directory is empty; {mode} trains on the images of a folder, "
                                      "so set it to that folder")
_IMAGES = tuple(Need(attr, f"{key} is not set; {{mode}} learns the change from the original image to the "
                           "target image, so give both image files")
                for key, attr in (("original image", "original_image"), ("target image", "target_image")))

register_mode(Mode(
    name="LoRA", tasks="trainer.modes.lora", inputs="images", needs=(_FOLDER,),
    text_encoder=True,  # the only mode whose network can include the text encoder (BASE)
    latents_on_first_use=True,
))
register_mode(Mode(
    name="iLECO", tasks="trainer.modes.ileco", inputs="prompts",
    needs=(Need("original_prompt", "original prompt is empty; iLECO moves the concept of the original prompt "
                                   "toward the target prompt (blank target = erase it), so write the concept"),),
    # The reference shows this one in iLECO although nothing reads it; it stays there so every
    # saved key has a widget.
    shown_without_effect=frozenset({"network_train_text_encoder"}),
))
register_mode(Mode(
    name="Difference", tasks="trainer.modes.difference", inputs="two images", needs=_IMAGES,
    passes=("copy", "main"),  # the copy network learns the original image, then stays applied for pass 2
))
register_mode(Mode(name="ADDifT", tasks="trainer.modes.addift", inputs="two images", needs=_IMAGES))
register_mode(Mode(
    name="Multi-ADDifT", tasks="trainer.modes.addift", inputs="image pairs",
    needs=(_FOLDER, Need("diff_target_name", "diff_target_name is empty; Multi-ADDifT pairs 'name.png' with "
                                             "'name<suffix>.png', so set the suffix, e.g. \"_closed_eyes\"")),
))

__all__ = ["Mode", "Need", "all_modes", "get_mode", "register_mode"]
