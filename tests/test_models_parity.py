"""Parity with the published FFF-VDI code: its outputs on random weights (shared/fixtures/parity)."""

from __future__ import annotations

import torch

from fff_vdi.models import FFFVDIUNet, load_flow_completion, load_raft
from models_fixtures import load_parity, parity_dir, relative_error  # noqa: F401  (parity_dir is a fixture)

TOLERANCE = 1e-4


def test_raft_from_raft_things_layout_matches_published(parity_dir, tmp_path):
    fixture = load_parity(parity_dir, "raft_large.pt")
    # The real raft-things.pth is a bare state dict with `module.` keys, like the fixture's.
    path = tmp_path / "raft-things.pth"
    torch.save(fixture["state_dict"], path)
    raft = load_raft(path)

    flow = raft(fixture["image1"], fixture["image2"], iters=fixture["iters"])

    assert flow.shape == fixture["flow_up"].shape
    assert relative_error(flow, fixture["flow_up"]) <= TOLERANCE


def test_raft_final_flow_equals_torchvision_forward(parity_dir, tmp_path):
    """Our loop upsamples only the last iteration; it must equal torchvision's own forward."""
    fixture = load_parity(parity_dir, "raft_large.pt")
    torch.save({"state_dict": fixture["state_dict"]}, tmp_path / "raft.pth")  # the {"state_dict": ...} form
    raft = load_raft(tmp_path / "raft.pth")

    with torch.no_grad():
        expected = raft.raft(fixture["image1"], fixture["image2"], num_flow_updates=3)[-1]
    assert torch.allclose(raft(fixture["image1"], fixture["image2"], iters=3), expected, rtol=0, atol=1e-5)
    assert raft.raft.corr_block.corr_pyramid == []  # the correlation volume is not kept after a call


def test_flow_completion_matches_published(parity_dir, tmp_path):
    fixture = load_parity(parity_dir, "flow_completion.pt")
    torch.save(fixture["state_dict"], tmp_path / "recurrent_flow_completion.pth")
    completion = load_flow_completion(tmp_path)  # a folder holding the file works too
    flows, masks = (fixture["flows_forward"], fixture["flows_backward"]), fixture["masks"]

    pred_forward, pred_backward = completion.complete_bidirectional(*flows, masks)
    combined_forward, combined_backward = completion(*flows, masks)

    assert relative_error(pred_forward, fixture["pred_forward"]) <= TOLERANCE
    assert relative_error(pred_backward, fixture["pred_backward"]) <= TOLERANCE
    assert relative_error(combined_forward, fixture["combined_forward"]) <= TOLERANCE
    assert relative_error(combined_backward, fixture["combined_backward"]) <= TOLERANCE
    # Outside the holes the input flows pass unchanged: forward t->t+1 uses frame t's mask,
    # backward t+1->t frame t+1's.
    outside_forward = (1 - masks[:, :-1]).bool().expand_as(combined_forward)
    outside_backward = (1 - masks[:, 1:]).bool().expand_as(combined_backward)
    assert torch.equal(combined_forward[outside_forward], flows[0][outside_forward])
    assert torch.equal(combined_backward[outside_backward], flows[1][outside_backward])


def test_tiny_unet_matches_published(parity_dir):
    io = load_parity(parity_dir, "fff_vdi_unet_tiny_io.pt")
    unet = FFFVDIUNet.from_pretrained(parity_dir / "fff_vdi_unet_tiny")

    with torch.no_grad():
        out = unet(
            io["sample"],
            io["masks"],
            (io["flows_forward"], io["flows_backward"]),
            io["timestep"],
            io["encoder_hidden_states"],
            io["added_time_ids"],
        )

    assert out.shape == io["out"].shape
    assert relative_error(out, io["out"]) <= TOLERANCE
