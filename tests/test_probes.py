"""The recorder returns exactly what the model computes."""

import torch

from mechlora.data import EXAMPLE_PATH, load_groups, load_image
from mechlora.probes import Site, all_sites, record


def _inputs(subject, with_image=True):
    g = load_groups(EXAMPLE_PATH)[0]
    image = load_image(g.image) if with_image else None
    return subject.encode([g.variants[0].text], [image])


def test_resid_equals_hidden_states(tiny_vlm):
    s = tiny_vlm
    inputs = _inputs(s)
    T = inputs["input_ids"].shape[1]
    positions = torch.arange(T)[None]
    with torch.no_grad(), record(s, all_sites(s.n_layers, ["resid"]), positions) as rec:
        out = s.model(**inputs, output_hidden_states=True)
    hs = out.hidden_states
    for layer in range(s.n_layers - 1):
        torch.testing.assert_close(rec[Site(layer, "resid")], hs[layer + 1], rtol=0, atol=0)
    # HF applies the final norm to the last hidden state; the hook sees the layer's own output.
    last = s.final_norm(rec[Site(s.n_layers - 1, "resid")])
    torch.testing.assert_close(last, hs[-1], rtol=1e-6, atol=1e-6)


def test_attn_and_mlp_outputs_rebuild_the_residual_stream(tiny_vlm):
    """Gemma 3: h_l = h_{l-1} + post_attn_norm(attn_l) + post_ff_norm(mlp(pre_ff_norm(...)))."""
    s = tiny_vlm
    inputs = _inputs(s)
    T = inputs["input_ids"].shape[1]
    sites = all_sites(s.n_layers)
    with torch.no_grad(), record(s, sites, torch.arange(T)[None]) as rec:
        out = s.model(**inputs, output_hidden_states=True)
        for layer in range(s.n_layers - 1):
            block = s.layers[layer]
            h_prev = out.hidden_states[layer]
            mid = h_prev + block.post_attention_layernorm(rec[Site(layer, "attn")])
            mlp = block.mlp(block.pre_feedforward_layernorm(mid))
            torch.testing.assert_close(rec[Site(layer, "mlp")], mlp, rtol=1e-5, atol=1e-5)
            rebuilt = mid + block.post_feedforward_layernorm(mlp)
            torch.testing.assert_close(rebuilt, out.hidden_states[layer + 1], rtol=1e-5,
                                       atol=1e-5)


def test_record_keeps_only_requested_positions(tiny_text):
    s = tiny_text
    inputs = _inputs(s, with_image=False)
    T = inputs["input_ids"].shape[1]
    with torch.no_grad(), record(s, [Site(2, "mlp")], torch.tensor([[T - 1, T - 3]])) as rec:
        out = s.model(**inputs, output_hidden_states=True)
    assert rec[Site(2, "mlp")].shape == (1, 2, s.text_config.hidden_size)
    assert len(rec) == 1
    assert out.hidden_states[0].shape[1] == T
