"""The official FCMAE checkpoint fixture: loads safely, maps to timm, reproduces the official features."""
import timm
import torch
from _util import FIXTURES, rel_err

from sparse_fcmae.checkpoint import load_checkpoint
from sparse_fcmae.convert import sparse_to_timm
from sparse_fcmae.models import FCMAE, SparseConvNeXtV2


def _fixture():
    ckpt = load_checkpoint(FIXTURES / "official_fcmae_atto.pth")  # weights_only, Namespace allowed
    feats = torch.load(FIXTURES / "official_atto_features.pt", weights_only=True)
    return ckpt, feats


def test_official_encoder_mapped_to_timm_reproduces_features():
    ckpt, feats = _fixture()
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=0).eval()
    missing, unexpected = model.load_state_dict(sparse_to_timm(ckpt["model"], "atto"), strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing)
    with torch.no_grad():
        out = model.forward_features(feats["input"])
    assert rel_err(out, feats["features"]) < 1e-5


def test_official_checkpoint_loads_strictly_into_fcmae_and_sparse_encoder_reproduces_features():
    ckpt, feats = _fixture()
    args = ckpt["args"]
    model = FCMAE("atto", in_chans=3, decoder_depth=args.decoder_depth, decoder_dim=args.decoder_embed_dim)
    model.load_state_dict(ckpt["model"], strict=True)
    enc: SparseConvNeXtV2 = model.encoder.eval()
    with torch.no_grad():
        out = enc.forward_features(feats["input"])  # mask ratio 0: every site visible
    assert rel_err(out, feats["features"]) < 1e-5
