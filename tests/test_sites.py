"""Sites and divergences against independent computations: a hand-written Gemma 3 forward
(tests/gemma3_reference.py) for resid, attn and mlp patching on pairs of different lengths,
and the logit-lens KL computed directly from the model's hidden states."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mechlora.data import QuestionGroup, Variant, make_pairs
from mechlora.localize import localize
from mechlora.probes import COMPONENTS
from tests import gemma3_reference as ref
from tests.tiny import gemma3_text

GROUPS = [QuestionGroup(id="g0", variants=(Variant("is there fluid?"),
                                           Variant("does this film show an effusion?",
                                                   "lexical")), answer="yes"),
          QuestionGroup(id="g1", variants=(Variant("is the heart enlarged?"),
                                           Variant("cardiomegaly?", "lexical")), answer="no")]


@pytest.fixture(scope="module")
def subject():
    return gemma3_text(16, seed=2)  # sliding layers with a window shorter than every prompt


def test_the_reference_forward_is_the_model(subject):
    ids = subject.encode(["does this film show an effusion?"])["input_ids"]
    with torch.no_grad():
        logits, _ = ref.forward(subject.model, ids)
        torch.testing.assert_close(logits, subject.model(input_ids=ids).logits[0, -1],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["last", "suffix:3"])
def test_resid_attn_and_mlp_restoration_equal_the_hand_written_forward(subject, positions):
    result = localize(subject, GROUPS, positions=positions, engine="auto", min_delta=0.1,
                      progress=False)
    pairs = {p.id: p for p in make_pairs(GROUPS)}
    assert result.n_pairs >= 3
    k = 1 if positions == "last" else 3
    ids_of = {}
    for row, pid in enumerate(result.pair_ids):
        pair = pairs[pid]
        a, b = (subject.encode([pair.group.variants[v].text])["input_ids"][0]
                for v in (pair.a, pair.b))
        assert len(a) != len(b)  # pairs of different lengths
        yes_no = subject.answer_token_ids(pair.group.choices)
        sign = 1 if pair.group.answer_index == 0 else -1
        ids_of[pid] = (a, b)
        with torch.no_grad():
            logits_a, acts_a = ref.forward(subject.model, a, record=torch.arange(len(a) - k,
                                                                                 len(a)))
            logits_b, _ = ref.forward(subject.model, b)
            m_a, m_b = (sign * (lg[yes_no[0]] - lg[yes_no[1]]) for lg in (logits_a, logits_b))
            np.testing.assert_allclose([result.margin_a[row], result.margin_b[row]],
                                       [m_a, m_b], rtol=1e-5, atol=1e-5)
            where = torch.arange(len(b) - k, len(b))
            for comp in COMPONENTS:
                for layer in range(subject.n_layers):
                    patched, _ = ref.forward(subject.model, b, patch={
                        (layer, comp): (where, acts_a[(layer, comp)])})
                    m = sign * (patched[yes_no[0]] - patched[yes_no[1]])
                    r = float((m - m_b) / (m_a - m_b))
                    assert result.restoration[comp][row, layer] == pytest.approx(r, abs=1e-4), \
                        (pid, comp, layer)


def test_logit_lens_kl_equals_a_direct_computation(subject):
    result = localize(subject, GROUPS, components=["resid"], min_delta=1e-3, progress=False)
    pairs = {p.id: p for p in make_pairs(GROUPS)}
    norm, head = subject.model.model.norm, subject.model.lm_head
    for row, pid in enumerate(result.pair_ids):
        pair = pairs[pid]
        lens = []
        for v in (pair.a, pair.b):
            inputs = subject.encode([pair.group.variants[v].text])
            with torch.no_grad():
                out = subject.model(**inputs, output_hidden_states=True)
                # layer l's output is hidden_states[l + 1]; the last one already went
                # through the final norm, so the model's own logits are its lens
                layers = [head(norm(h[0, -1])) for h in out.hidden_states[1:-1]]
                layers.append(out.logits[0, -1])
            lens.append(F.log_softmax(torch.stack(layers).float(), -1))
        kl = (lens[0].exp() * (lens[0] - lens[1])).sum(-1)
        np.testing.assert_allclose(result.divergence["logit_lens_kl"][row], kl.numpy(),
                                   rtol=1e-4, atol=1e-6)
        assert kl[-1] > 0
