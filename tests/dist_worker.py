"""One rank of tests/test_distributed.py: quantizes a tiny model with several recipes, in memory and streamed,
inside one process group (started by torch's elastic launcher), so the group starts once for all of them.

argv: src_folder out_root calib.pt recipe[,recipe...]
"""

import sys
from pathlib import Path

import torch


def main() -> None:
    src, out_root, calib_path, recipes = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
    import quantkit as qk
    from conftest import tiny_llama
    from quantkit import distributed
    from quantkit.pipeline import quantize_model
    from quantkit.recipe import load_recipe

    dist, device = distributed.init_from_env("cpu")
    calib = torch.load(calib_path)
    for name in recipes:
        model = tiny_llama()  # the weights make_source saved to `src`
        quantize_model(model, load_recipe(name), calib, device=device, progress=False)
        model.quantkit_recipe = load_recipe(name).to_dict()
        if dist.is_writer:
            qk.save(model, out_root / f"mem-{name}")
        qk.quantize_streaming(src, name, out_root / f"off-{name}", calibration=calib, progress=False,
                              log=lambda s: None, max_activation_memory="20KB")
    dist.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main()
