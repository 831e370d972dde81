"""ComfyUI's Cancel stops SISO's decoder copy and both similarity networks within one block's
work: the interrupt flag is set from inside block k, and no block after k+1 may run. Block
runs are counted, nothing is timed."""
import pytest
import torch

import comfy.model_management
import comfy.ops
import tiny
from conftest import siso

fn = siso("siso_ops.feature_networks")
host = siso("siso_ops.host")
Interrupted = comfy.model_management.InterruptProcessingException


class BlockLog:
    """Which of ``blocks`` started and finished, in run order; sets ComfyUI's interrupt flag
    (what POST /interrupt does) when the block ``cancel_in`` (an index in run order) finishes."""

    def __init__(self, blocks, cancel_in=None):
        self.started, self.finished, self.cancel_in = [], [], cancel_in
        self.handles = []
        for index, block in enumerate(blocks):
            # prepend: counted before any check of the pack's can refuse the block
            self.handles.append(block.register_forward_pre_hook(self._start(index), prepend=True))
            self.handles.append(block.register_forward_hook(self._finish(index)))

    def _start(self, index):
        return lambda module, args: self.started.append(index)

    def _finish(self, index):
        def finished(module, args, output):
            self.finished.append(index)
            if len(self.finished) - 1 == self.cancel_in:
                comfy.model_management.interrupt_current_processing(True)
        return finished

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def interrupt_flag():
    comfy.model_management.interrupt_current_processing(False)
    try:
        yield
    finally:
        comfy.model_management.interrupt_current_processing(False)


# ----------------------------------------------------------------------------- similarity networks
def _networks(tmp_path):
    import safetensors.torch
    dino_path, ir_path = str(tmp_path / "dino.safetensors"), str(tmp_path / "ir_features.pth")
    safetensors.torch.save_file(tiny.dino_state_dict(meta_format=False, depth=4), dino_path)
    torch.save(tiny.ir_state_dict(depth=4), ir_path)
    with torch.inference_mode(False):
        return {"dino": fn.load_dino(dino_path), "ir": fn.load_ir(ir_path)}


def _transformer_blocks(network):
    module = network.module
    return list((module.backbone if hasattr(module, "backbone") else module).blocks)


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    return _networks(tmp_path_factory.mktemp("networks"))


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("kind", ["dino", "ir"])
def test_cancel_stops_a_similarity_network_within_one_transformer_block(networks, interrupt_flag, kind, checkpointing):
    network = networks[kind]
    blocks = _transformer_blocks(network)
    assert len(blocks) == 4
    network.set_interrupt_check(host.throw_if_interrupted)
    network.set_checkpointing(checkpointing)
    log = BlockLog(blocks, cancel_in=1)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            image = torch.rand(1, 3, 96, 80, requires_grad=True)
            with pytest.raises(Interrupted):
                network.embed(image)
    finally:
        log.remove()
        network.set_checkpointing(False)
        network.set_interrupt_check(None)
    assert log.finished == [0, 1]
    assert max(log.started) <= 2      # block k + 2 = 3 never ran


@pytest.mark.parametrize("kind", ["dino", "ir"])
def test_a_network_whose_run_ended_keeps_no_check(networks, interrupt_flag, kind):
    """After set_interrupt_check(None) (the end of a run) the cached network ignores the flag, as
    it did before any run: the checks are hooks of one run, not left on the network."""
    network = networks[kind]
    network.set_interrupt_check(host.throw_if_interrupted)
    network.set_interrupt_check(host.throw_if_interrupted)   # set twice: still one check per block
    network.set_interrupt_check(None)
    log = BlockLog(_transformer_blocks(network), cancel_in=0)
    try:
        with torch.inference_mode(False):
            out = network.embed(torch.rand(1, 3, 64, 64))
    finally:
        log.remove()
    assert out.shape[0] == 1 and log.finished == [0, 1, 2, 3]
    assert all(len(m._forward_pre_hooks) == 0 for m in network.module.modules())


def test_a_network_check_runs_once_per_block(networks, interrupt_flag):
    """The check runs before every block (and its attention and MLP: check_before_blocks), once:
    setting a second check replaces the first's hooks rather than adding to them."""
    calls = []
    network = networks["dino"]
    try:
        network.set_interrupt_check(lambda: calls.append(1))
        with torch.inference_mode(False):
            network.embed(torch.rand(1, 3, 64, 64))
        once = len(calls)
        calls.clear()
        network.set_interrupt_check(lambda: calls.append(2))   # replaces the first
        network.set_interrupt_check(lambda: calls.append(2))   # and itself, set again
        with torch.inference_mode(False):
            network.embed(torch.rand(1, 3, 64, 64))
    finally:
        network.set_interrupt_check(None)
    assert set(calls) == {2} and len(calls) == once, (once, len(calls))
    assert once >= len(_transformer_blocks(network))


# ----------------------------------------------------------------------------- decoder copy
def _decoder_for(channels):
    family = "sd15" if channels == 4 else "flux_schnell"
    model, vae = tiny.build_model(family), tiny.build_vae(channels)
    assert vae.first_stage_model.decoder.conv_in.in_channels == channels
    with torch.inference_mode(False):
        return host.DifferentiableDecoder(vae, model, torch.device("cpu")), vae, channels


def _resnet_blocks_in_run_order(decoder, latent):
    """The decoder copy's ResNet blocks in the order a decode runs them."""
    candidates = [m for m in decoder.module.modules() if type(m).__name__ == "ResnetBlock"]
    order = []
    handles = [m.register_forward_hook(lambda module, a, o: order.append(module)) for m in candidates]
    try:
        with torch.inference_mode(False), torch.no_grad():
            decoder(latent)
    finally:
        for handle in handles:
            handle.remove()
    assert len(order) >= 6
    return order


@pytest.mark.parametrize("layer_checks", ["comfyui layers check too", "only the pack's block checks"])
@pytest.mark.parametrize("channels", [4, 16])
def test_cancel_stops_the_decoder_copy_within_one_block(interrupt_flag, monkeypatch, channels, layer_checks):
    """For SD's 4-channel and Flux's 16-channel VAE as ComfyUI builds them. With ComfyUI's own
    per-layer check switched off the copy's block checks alone must stop it."""
    decoder, vae, _ = _decoder_for(channels)
    latent = torch.randn(1, channels, 8, 8)
    blocks = _resnet_blocks_in_run_order(decoder, latent)
    if layer_checks != "comfyui layers check too":
        monkeypatch.setattr(comfy.ops, "run_every_op", lambda: None)
    k = 2
    log = BlockLog(blocks, cancel_in=k)
    try:
        with torch.inference_mode(False), torch.enable_grad(), pytest.raises(Interrupted):
            decoder(latent.clone().requires_grad_(True))
    finally:
        log.remove()
        decoder.release()
    assert log.finished == [0, 1, 2]
    assert max(log.started) <= k + 1


def test_the_released_decoder_copy_keeps_no_check_and_the_host_vae_never_had_one(interrupt_flag, monkeypatch):
    decoder, vae, _ = _decoder_for(4)
    copy = decoder.module
    assert any(len(m._forward_pre_hooks) for m in copy.modules())   # the copy is checked while in use
    decoder.release()
    assert all(len(m._forward_pre_hooks) == 0 for m in copy.modules())
    assert all(len(m._forward_pre_hooks) == 0 for m in vae.first_stage_model.modules())
    # Behaviour: with ComfyUI's layer checks off and the flag set, the released copy runs through.
    monkeypatch.setattr(comfy.ops, "run_every_op", lambda: None)
    comfy.model_management.interrupt_current_processing(True)
    with torch.inference_mode(False), torch.no_grad():
        out = copy.decode(torch.randn(1, 4, 8, 8))
    assert out.shape == (1, 3, 64, 64)


# ----------------------------------------------------------------------------- the memory estimate
def test_cancel_during_the_memory_estimate_stops_the_run(sd15, subject, tiny_networks, interrupt_flag, monkeypatch,
                                                         caplog):
    """The memory estimate's shape-only pass runs ComfyUI's own layers, which check Cancel (and
    clear the flag as they raise): SISO must pass the Cancel on, not take it for a layer the probe
    cannot run (a warning, an estimate-less run with low_memory on and minutes of training)."""
    gen, memory, optim = siso("siso_ops.generation"), siso("siso_ops.memory"), siso("siso_ops.optimize")
    model, vae, positive, _ = sd15
    estimated, loops = [], []
    estimate = memory.estimate_iteration

    def cancelled_while_estimating(*args, **kwargs):
        estimated.append(1)
        comfy.model_management.interrupt_current_processing(True)     # POST /interrupt, mid-estimate
        return estimate(*args, **kwargs)
    monkeypatch.setattr(memory, "estimate_iteration", cancelled_while_estimating)
    monkeypatch.setattr(gen, "_loop", lambda *a, **k: loops.append(1) or pytest.fail("the loop ran after Cancel"))
    settings = gen.GenerationSettings(width=64, height=64, seed=0, precision="fp32", gradient_checkpointing="auto",
                                      optimization=optim.OptimizationSettings(max_iterations=2))
    with pytest.raises(Interrupted), torch.inference_mode():
        gen.optimize_subject(model, vae, positive, subject, None, None, settings, feature_networks=tiny_networks)
    assert estimated == [1] and loops == []
    assert "memory estimate unavailable" not in caplog.text
