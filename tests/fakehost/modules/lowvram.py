"""Fake ``modules.lowvram`` (A1111): --lowvram/--medvram bookkeeping."""

module_in_gpu = None
applied = []


def is_needed(sd_model):
    from modules import shared

    return bool(shared.cmd_opts.lowvram or shared.cmd_opts.medvram)


def apply(sd_model):
    sd_model.lowvram = is_needed(sd_model)
    applied.append(sd_model)


def send_everything_to_cpu():
    global module_in_gpu
    if module_in_gpu is not None:
        module_in_gpu.to("cpu")
    module_in_gpu = None
