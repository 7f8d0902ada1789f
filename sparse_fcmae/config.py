"""The configuration: hydra's composition of conf/, the one source of every default."""
from __future__ import annotations

import os
import pathlib

from omegaconf import DictConfig, OmegaConf


def config_dir() -> pathlib.Path:
    """The hydra config folder: $SPARSE_FCMAE_CONF, the installed copy, or the source tree's conf/."""
    env = os.environ.get("SPARSE_FCMAE_CONF")
    here = pathlib.Path(__file__).resolve().parent
    for cand in ([pathlib.Path(env)] if env else []) + [here / "conf", here.parent / "conf"]:
        if (cand / "pretrain.yaml").is_file():
            return cand
    raise FileNotFoundError("cannot find the config folder (conf/pretrain.yaml); set SPARSE_FCMAE_CONF")


def compose(name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        try:
            return hydra_compose(config_name=name, overrides=overrides)
        except HydraException as e:
            # hydra's hint ("To append to your config use +data.max_image=16") is on a later line: keep
            # every line, joined, since the user sees one error line
            text = str(e).split("Config search path")[0]  # hydra's search path list: noise here
            if "mismatched input '{'" in text:  # a shard pattern's braces read as hydra's dict syntax
                text += "\n(quote a brace pattern for hydra: \"data.urls='/data/train-{000000..000099}.tar'\")"
            raise ValueError(" ".join(ln.strip() for ln in text.splitlines() if ln.strip())) from None


def with_defaults(cfg: DictConfig, name: str) -> DictConfig:
    """``cfg`` over the defaults of ``conf/<name>.yaml``: a config written by hand or by an older version
    gains the keys it lacks from the YAML, so the code reads ``cfg.key`` and states no default of its own."""
    base = compose(name, [])
    OmegaConf.set_struct(base, False)  # a data group other than the default may bring keys of its own
    return OmegaConf.merge(base, cfg)
