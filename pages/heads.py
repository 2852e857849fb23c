"""Heads: direct-effect scores DE_A..DE_D per head (paper Eq. 6-9) and the choice of heads (Alg. 1, Eq. 10)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from refineclip_core.method.ablation import MODES
from refineclip_core.method.protocol import SELECTION_RULES, PairSpec, pair_spec
from refineclip_core.method.scores import SIMILARITIES
from refineclip_core.names import visible
from refineclip_core.reporting.figures import selection_name
from dashboard import resources
from dashboard.pairs import LABELLED, ranked_pairs
from dashboard.registry import page
from dashboard.state import ablate_heads, inspect_head, protocol, set_ablate_heads, set_protocol
from dashboard.panels import attribute_panel, sanity_panel, score_maps_panel, stability_panel
from dashboard.widgets import link, plain, require_ready, table

st.title(page("heads").heading)
st.caption("For an error pair (true y → predicted ŷ), each head's direct effect compares how much replacing its "
           "contribution moves images toward y versus ŷ (paper Eq. 6–9). DE_A and DE_C: highest = most "
           "suspicious; DE_B and DE_D: lowest. Click a square to inspect that head.")
ready = require_ready()
cache, eng = ready.cache, ready.engine
classes = cache.classes
proto = protocol()

# --- controls ---------------------------------------------------------------------------------
pairs, n_labelled = ranked_pairs(ready, proto)      # the one ranking: on the labelled images
pair_options = {"auto": f"largest error pair on the {LABELLED} (auto)", "both": "largest pair, both directions"}
for p in pairs:
    pair_options[pair_spec(p.true, p.pred, classes)] = f"{p.label(classes)} ({p.count} of {n_labelled} {LABELLED})"
if proto.pair not in pair_options:
    pair_options[proto.pair] = PairSpec.parse(proto.pair).label()
n_heads_total = len(cache.manifest.layers) * cache.manifest.n_heads
with st.form("heads_controls"):
    c = st.columns([2.6, 1, 1, 1, 1.3, 1.4, 1.1])     # wide enough for 'cosine' and 'consensus' at 1400 px
    pair = c[0].selectbox("Error pair", list(pair_options), format_func=lambda k: visible(pair_options[k]),
                          index=list(pair_options).index(proto.pair), key="heads_pair")
    n = c[1].number_input("Samples per class", 1, 10_000, proto.samples_per_class or 10, key="heads_n",
                          help="Labelled images drawn per class of the pair (paper: 10), from the val split if "
                               "there is one, else train, else all images.")
    seed = c[2].number_input("Seed", 0, 1_000_000, proto.seed, key="heads_seed")
    top_t = c[3].number_input("Top-T", 1, n_heads_total, min(proto.top_t, n_heads_total), key="heads_top_t",
                              help="Length of each score's candidate list in Alg. 1.")
    sim = c[4].selectbox("Similarity", SIMILARITIES, index=SIMILARITIES.index(proto.similarity),
                         key="heads_sim", help="With 'dot', DE_A = −DE_B and DE_C = −DE_D exactly (Proposition 1).")
    rule = c[5].selectbox("Selection", list(SELECTION_RULES), index=SELECTION_RULES.index(proto.selection),
                          key="heads_rule", help="stable: heads ranked by how often the consensus chose them on "
                                                 "resamples of the labelled images, best prefix by utility; consensus: "
                                                 "one ranking from all four scores, best prefix by utility; alg1: the "
                                                 "paper's Algorithm 1 (best of each list).")
    removal = c[6].selectbox("Ablation", MODES, index=MODES.index(proto.ablation),
                             key="heads_ablation", help="How removed heads are replaced: their mean (default) or "
                                                        "zero (the paper's Eq. 5).")
    if st.form_submit_button("Score the heads", type="primary"):
        set_protocol(pair=pair, samples_per_class=int(n), seed=int(seed), top_t=int(top_t), similarity=sim,
                     selection=rule, ablation=removal)
        st.rerun()

ident = ready.ident()
sanity_panel(ready, ident)
sel = ident.selection
set_text = "; ".join(f"{k}: W={s.sizes()['W']}, C={s.sizes()['C']}, A={s.sizes()['A']}" for k, s in ident.sets.items())
st.caption(f"{len(ident.sample_rows)} labelled samples · {plain(set_text)} · W = misclassified as ŷ, C = correct "
           f"images of y, A = correct images of ŷ.")

RULE_TEXT = {"stable": "The resampling-stable ranking", "consensus": "The consensus ranking"}

# --- score maps --------------------------------------------------------------------------------
selected = inspect_head()
score_maps_panel(ident, cache.manifest.n_heads, selected, selection_name(sel.score))
st.caption(f"White dot: the heads chosen by {selection_name(sel.score)} · gold border: the head selected for the "
           "inspector · hover a square for its score value and rank.")
if selected is not None and selected.layer in cache.manifest.layers:
    vals = {name: s.value(selected) for name, s in ident.scores.items() if s.available}
    ranks = {name: s.ranking().index(selected) + 1 for name, s in ident.scores.items() if s.available}
    st.markdown(f"**Selected head {selected}** — " + " · ".join(
        f"{plain(k)} = {v:.4g} (rank {ranks[k]})" for k, v in vals.items()))
    link("inspector", f"Inspect {selected} →")

# --- Alg. 1 -------------------------------------------------------------------------------------
st.subheader("Choosing the heads (stable, consensus or Alg. 1; utility of Eq. 10)")
if not sel.curves:
    st.warning("No score is available for this pair, so there is nothing to choose from.")
    st.stop()
st.plotly_chart(resources.utility_chart(sel.curves, sel.baseline_utility, sel.score, sel.t, sel.candidates),
                key="heads_utility")
if sel.score:
    st.markdown(f"{RULE_TEXT.get(sel.score, 'Alg. 1')} picks the first **{sel.t}** "
                f"heads of **{plain(sel.score)}**: **{', '.join(str(h) for h in sel.heads)}** (utility {sel.utility:.4f} "
                f"vs. {sel.baseline_utility:.4f} with no head removed).")
else:
    st.info("No prefix of the ranking beats removing nothing on the labelled samples: no head is chosen.")
stability_panel(sel.stability, sel.heads)
st.markdown("**Top-T candidate lists**")
table("head-candidates", pd.DataFrame({str(name): [str(h) for h in lst] + [""] * (max(map(len, sel.candidates.values())) - len(lst))
                           for name, lst in sel.candidates.items()}).rename_axis("rank").rename(lambda i: i + 1),
             height=min(38 * (len(next(iter(sel.candidates.values()))) + 1), 300))

c = st.columns([1, 2, 2])
avail = list(sel.candidates)
score_choice = c[0].selectbox("Set from score", avail, index=avail.index(sel.score) if sel.score in avail else 0,
                              key="heads_set_score", format_func=visible)
cands = sel.candidates[score_choice]
t_default = sel.t if score_choice == sel.score else 1
# the slider follows the scores it describes: a new scoring (or another score) starts it at the chosen t
t_key = f"heads_set_t_{abs(hash((resources.protocol_key(ident.config), score_choice))) % 10**9}"
t_choice = c[1].slider("Number of heads t", 1, len(cands), min(t_default, len(cands)), key=t_key)
chosen = cands[:t_choice]
c[2].markdown(f"Set: **{', '.join(str(h) for h in chosen)}**")
if st.button("Use this set", type="primary", key="heads_use_set"):
    set_ablate_heads(chosen)
attribute_panel(ready, ident)
current = ablate_heads()
if current is not None:
    st.success(f"Head set for Ablate and Refine: {', '.join(str(h) for h in current) or 'none'}",
               icon=":material/check_circle:")
    link("ablate", "Try it on the Ablate page →")
