"""Read-outs shared by pages: the findings at a glance (led by the diagnosis), what the loaded data
holds, what one head has to do with the diagnosis, the known-attribute head ranking, and the Refine
page's checkpoint download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from refineclip_core.demo.world import on_demo_world
from refineclip_core.edit.guard import HARMFUL, VERIFIED, EditVerdict
from refineclip_core.edit.sanity import sanity_warnings
from refineclip_core.errors import RefineClipError
from refineclip_core.features.cache import FeatureCache
from refineclip_core.features.decomposition import HeadId
from refineclip_core.inspection.diagnosis import Diagnosis, attribute_direction, attribute_heads
from refineclip_core.method.protocol import Identification
from refineclip_core.method.scores import SCORE_SPECS
from refineclip_core.names import visible
from refineclip_core.method.stability import HeadStability
from refineclip_core.reporting.figures import group_profile_figure
from refineclip_core.reporting.tables import verdict_rows
from refineclip_core.loading.data import ImageDataset
from refineclip_core.loading.hf_clip import zip_folder
from refineclip_core.session.source import Source

from . import resources
from .pairs import HELD_OUT, LABELLED, labelled_rows, pair_count, ranked_pairs
from .registry import PAGES
from .state import Key, ablate_heads, get, protocol, put, set_ablate_heads, set_inspect_head
from .widgets import Ready, guard, link, metric_ci, plain, table


def stability_panel(stability: HeadStability | None, heads: list[HeadId]) -> None:
    """How often each head of ``heads`` (and each head at least half of the resamples chose) was chosen on bootstrap
    resamples of the labelled images; one-off choices flagged (:meth:`HeadStability.rows`)."""
    if stability is None or not stability.resamples:
        return
    rows = stability.rows(heads)
    odd = stability.one_off(heads)
    text = (f"**How stable is this choice?** The same choice repeated on {stability.resamples} bootstrap resamples "
            f"of the labelled images.")
    if odd:
        st.warning(f"{text} {len(odd)} of the {len(heads)} chosen heads were chosen in fewer than half of the "
                   f"resamples (one-off choices of this draw): {', '.join(map(str, odd))}.", icon=":material/warning:")
    else:
        st.markdown(text + (" Every chosen head was chosen in at least half of them." if heads else ""))
    if rows:
        table("head-stability", pd.DataFrame([{"head": r["head"], "in this set": "yes" if r["in_set"] else "no",
                                               "chosen in": f"{r['chosen_in']} of {r['resamples']} resamples",
                                               "note": r["note"]} for r in rows]),
              hide_index=True, height=min(38 * (len(rows) + 1), 300))


def findings_panel(ready: Ready) -> None:
    """The loaded source, and :func:`~refineclip_core.reporting.findings.findings` on it."""
    src, cache = ready.source, ready.cache
    st.success(plain(src.label), icon=":material/check_circle:")
    try:
        ident = resources.identification(src, cache, ready.engine, protocol())
    except RefineClipError as exc:
        st.info(f"No findings to show: {plain(exc)}")
        return
    f = resources.findings(src, cache, ready.engine, ident)
    st.subheader("Findings at a glance")
    sanity_panel(ready, ident)
    diagnosis_lead(ready, ident)
    st.caption(f"Measured on {f.n_eval} held-out images (the {len(ident.sample_rows)} labelled samples used to "
               f"choose the heads are excluded) — the same images and numbers as the Ablate and Refine pages; the "
               f"Errors page shows these rows under 'held-out images', and every image under 'all images'. "
               f"Each accuracy comes with its 95% interval and the number of images behind it.")
    rule = {"consensus": "the consensus of DE_A..DE_D",
            "stable": "how often the consensus of DE_A..DE_D chose them on resamples of the labelled images"
            }.get(f.score or "", f"Alg. 1 ({f.score})" if f.score else None)
    removal = "replacing them by their mean" if f.ablation == "mean" else "zeroing them"
    blame = (f"The heads to blame, by {rule}, are **{', '.join(f.heads)}**; {removal} needs no retraining (Eq. 5):"
             if f.heads else "No set of heads beats removing nothing on the labelled samples (pick heads on the "
                             "Heads page, or draw more samples):")
    pairs, n_labelled = ranked_pairs(ready, ident.config)
    a, b = ident.pairs[0]
    on_labelled = pair_count(ready.engine.base_predictions, ready.cache.labels, labelled_rows(ready.cache, ident.config),
                             a, b)
    most = "most often" if pairs and (pairs[0].true, pairs[0].pred) == (a, b) else "(the chosen pair)"
    st.markdown(f"The model confuses **{plain(f.pair)}** {most}: {on_labelled} of the {n_labelled} {LABELLED}, "
                f"{f.pair_count} of the {f.n_eval} {HELD_OUT}. {blame}")
    c = st.columns(4)
    metric_ci(c[0], "Zero-shot accuracy", f.accuracy)
    metric_ci(c[1], "… with those heads removed", f.ablated_accuracy, f.accuracy)
    if f.worst_group is not None:
        metric_ci(c[2], "Zero-shot worst group", f.worst_group)
        c[2].caption(plain(f.worst_group_name))
        metric_ci(c[3], "… with those heads removed", f.ablated_worst_group, f.worst_group)
        c[3].caption(plain(f.ablated_worst_group_name))
    elif f.target_accuracy is not None:
        metric_ci(c[2], "Error-pair classes", f.target_accuracy)
        metric_ci(c[3], "… with those heads removed", f.ablated_target_accuracy, f.target_accuracy)
    run = get(Key.REFINE)
    if run is not None and run.outcome.identification.config == ident.config:
        verdict_banner(run.verdict, f"The last edit ({run.outcome.exported})")
    for note in f.notes:
        st.caption(f"Unavailable score — {plain(note)}")
    others = [p.name for p in PAGES[1:]]
    for col, name in zip(st.columns(len(others)), others):
        link(name, where=col)
    data_summary(src, cache)


def on_demo(ready: Ready) -> bool:
    """Is this the demo world (the embedded demo, or a demo-data sample), where the defaults and the
    diagnosis were checked?"""
    return ready.source.is_demo or on_demo_world(ready.cache.classes)


def sanity_panel(ready: Ready, ident: Identification) -> None:
    """The sanity warnings (:mod:`refineclip_core.edit.sanity`) beside the numbers they qualify."""
    for w in sanity_warnings(ready.cache, ident, demo_data=on_demo(ready)):
        if w.kind == "untested-data":
            st.caption(plain(w.text))
        else:
            st.warning(plain(w.text), icon=":material/warning:")


def heldout_rows(ready: Ready) -> np.ndarray | None:
    """The held-out rows the Load, Ablate and Refine pages measure on (None when no pair can be identified)."""
    try:
        return resources.identification(ready.source, ready.cache, ready.engine, protocol()).eval_rows
    except RefineClipError:
        return None


def diagnosis_of(ready: Ready, ident: Identification, heads: list[HeadId] | None = None) -> Diagnosis | None:
    """The (cached) diagnosis of ``heads``, or None (with the reason shown) when it cannot be made."""
    with guard("Naming what the removed heads carry"):
        return resources.diagnosis(ready.source, ready.cache, ready.engine, ident, heads)
    return None


def diagnosis_lead(ready: Ready, ident: Identification, heads: list[HeadId] | None = None) -> Diagnosis | None:
    """The diagnosis sentence in a box, its ranked concepts one click away (class names and typed
    phrases are data: shown as plain text and in tables, never as Markdown)."""
    diag = diagnosis_of(ready, ident, heads)
    if diag is None:
        return None
    with st.container(border=True):
        st.caption("Why, in words (what removing the blamed heads takes out of the embedding, named by the "
                   "text pool's concepts; " + ("checked on the demo world where the cue is known):" if on_demo(ready)
                                               else "untested on these images, a hypothesis to check):"))
        for pair in diag.pairs:
            st.text(pair.sentence)
        n_concepts = sum(len(pair.concepts) for pair in diag.pairs)
        with st.expander(f"The ranked concepts ({n_concepts}) and the heads that carry them"):
            st.caption("One row per error pair and concept, in each pair's order (ranked by the concept's share of "
                       "the push toward the wrong class); heads: the removed heads carrying it, with their part.")
            table("concepts", pd.DataFrame([{
                "pair (true → predicted)": f"{pair.true} → {pair.wrong}", "concept": c.text,
                "heads": ", ".join(f"{h} ({c.head_shares.get(h, 0.0):.0%})" for h in c.heads),
                "push toward predicted": c.push_share, "share of removed variance": c.share,
                "errors carry": "more" if c.side == "errors" else "less",
                "errors vs correct (sd)": c.contrast, "coverage in scope": c.coverage,
                "random sets holding as much": c.p_random,
                "examples": "; ".join(c.descriptions)} for pair in diag.pairs for c in pair.concepts]),
                hide_index=True, column_config={
                    "push toward predicted": st.column_config.NumberColumn(format="percent"),
                    "share of removed variance": st.column_config.NumberColumn(format="percent"),
                    "coverage in scope": st.column_config.NumberColumn(format="percent"),
                    "random sets holding as much": st.column_config.NumberColumn(format="percent"),
                    "errors vs correct (sd)": st.column_config.NumberColumn(format="%+.2f")})
            for pair in diag.pairs:
                for note in pair.notes:
                    st.caption(plain(note))
    return diag


def head_concept_panel(ready: Ready, ident: Identification, head: HeadId) -> None:
    """Which diagnosed concept ``head`` carries, and its contribution along it per image group."""
    with guard("Relating the head to the diagnosis"):
        ev = resources.evidence(ready.source, ready.cache, ready.engine, ident, head)
        if ev.concept is None:
            st.caption("No diagnosis to relate this head to (no head is blamed for this pair).")
            return
        role = "in the set the diagnosis explains" if ev.in_set else "not in the set the diagnosis explains"
        st.text(f"{head} ({role}) writes {ev.share:.0%} of the diagnosed concept “{ev.concept.text}” among all "
                f"{ev.concept.n_scope} heads in scope (that concept is {ev.concept.share:.0%} of the set's variance).")
        st.plotly_chart(group_profile_figure(ev.profile, ev.concept.text), key="insp_profile")
        st.caption("Its contribution along that concept (mean ± sd per group, every image of the pair's classes): "
                   "a head that carries the cue separates the groups by the cue, not by the class.")


def attribute_panel(ready: Ready, ident: Identification) -> None:
    """Known-attribute mode (the paper's TextSpan*): rank heads by a typed cue, hand the set on."""
    with st.expander("Suspect a cue? Rank the heads by it (known-attribute mode)"):
        with st.form("heads_attr_form"):
            c = st.columns(2)
            a = c[0].text_input("Phrases for the cue (comma-separated)", "a water background, on water",
                                key="heads_attr_a")
            b = c[1].text_input("Contrasting phrases", "a land background, on land", key="heads_attr_b")
            go = st.form_submit_button("Rank the heads by this cue")
        if go:
            with guard("Ranking the heads by the typed cue"):
                side_a, side_b = [x for x in a.split(",") if x.strip()], [x for x in b.split(",") if x.strip()]
                u = attribute_direction(ready.loaded(), side_a, side_b)
                put(Key.ATTRIBUTE, attribute_heads(ready.cache, ident, side_a, side_b, u,
                                                   ident.ablation_engine(ready.engine)))
        res = get(Key.ATTRIBUTE)
        if res is None:
            st.caption("Heads are ranked by their share of the embedding's variance along the direction from the "
                       "contrasting phrases to the cue's; the best-utility prefix (Eq. 10) becomes the set.")
            return
        table("attribute-heads", pd.DataFrame({"head": [str(h) for h in res.ranking[:15]],
                                   "share of the cue direction": [res.shares[str(h)] for h in res.ranking[:15]],
                                   "in the set": [h in res.heads for h in res.ranking[:15]]}),
                     hide_index=True, column_config={"share of the cue direction":
                                                     st.column_config.NumberColumn(format="percent")})
        st.text(f"Cue: {' / '.join(res.side_a)}  versus  {' / '.join(res.side_b)} · set: "
                f"{', '.join(str(h) for h in res.heads) or 'none'}")
        if st.button("Use the cue's set for Ablate and Refine", key="heads_attr_use", disabled=not res.heads):
            set_ablate_heads(res.heads)
        if ablate_heads() == res.heads:
            st.success("The cue's heads are the set for Ablate and Refine.", icon=":material/check_circle:")


def data_summary(src: Source, cache: FeatureCache) -> None:
    """Images per class, group and split, the model's scope and every skipped file (opened once
    after an extraction)."""
    fresh = bool(get(Key.LOAD_FRESH))
    put(Key.LOAD_FRESH, False)
    with st.expander(f"Data: {len(cache)} images, {len(cache.classes)} classes, {len(cache.group_names)} groups, "
                     f"{len(cache.skipped) + len(src.extra_skipped)} files skipped", expanded=fresh):
        recs = cache.records
        df = pd.DataFrame({"class": [cache.classes[r.label] for r in recs], "group": [r.group or "–" for r in recs],
                           "split": [r.split or "–" for r in recs]})
        c1, c2 = st.columns(2)
        with c1:
            st.markdown("**Images per class and split**")
            table("images-per-class", pd.crosstab(df["class"], df["split"], margins=True, margins_name="total"))
        with c2:
            if cache.group_names:
                st.markdown("**Images per group and split**")
                table("images-per-group", pd.crosstab(df["group"], df["split"], margins=True, margins_name="total"))
            else:
                st.caption("No group labels (add a 'group' column to metadata.csv to get per-group accuracies).")
        man = cache.manifest
        st.caption(f"Model {plain(man.model_name)} · heads of layers {man.layers} ({man.n_heads} per layer) · "
                   f"embedding dim {man.embed_dim} · prompts: " + " | ".join(map(plain, list(man.templates)[:6])))
        skipped = [(s.path, s.reason) for s in cache.skipped] + list(src.extra_skipped)
        if skipped:
            st.markdown("**Skipped files**")
            table("skipped-files", pd.DataFrame(skipped, columns=["file", "reason"]), hide_index=True)


def scan_summary(dataset: ImageDataset) -> None:
    """What a scan found, before extraction."""
    df = pd.DataFrame({"class": [dataset.classes[r.label] for r in dataset.records],
                       "split": [r.split or "–" for r in dataset.records]})
    st.markdown(f"**{len(dataset)} images**, {len(dataset.classes)} classes ({dataset.layout} layout), "
                f"{len(dataset.groups)} groups, splits: {plain(', '.join(dataset.splits) or 'none')}; "
                f"{len(dataset.skipped)} files skipped.")
    table("scan-per-class", pd.crosstab(df["class"], df["split"]), height=min(36 * (len(dataset.classes) + 1) + 4, 300))
    if dataset.skipped:
        with st.expander(f"Skipped files ({len(dataset.skipped)})"):
            table("scan-skipped", pd.DataFrame([(s.path, s.reason) for s in dataset.skipped], columns=["file", "reason"]),
                  hide_index=True)


def verdict_banner(verdict: EditVerdict, lead: str) -> None:
    """The guard's verdict: its one sentence in a coloured box (only ``verified`` is green), the details
    (:meth:`EditVerdict.details`: the worst groups with their rows' intervals, the bounds the verdict rests
    on, what was not checked) in an expander under it."""
    show, icon = {VERIFIED: (st.success, ":material/verified:"), HARMFUL: (st.error, ":material/dangerous:")}.get(
        verdict.status, (st.warning, ":material/help:"))
    show(f"**{verdict.status}** · {plain(lead)}: {plain(verdict.sentence())}", icon=icon)
    with st.expander("Why: the numbers behind the verdict", expanded=False):
        st.markdown("\n".join(f"- {plain(d)}" for d in verdict.details()))


def outcome_notes(outcome) -> None:
    """What the exported edit's teacher also removed (the outcome's
    :class:`~refineclip_core.edit.concept.ConceptRemoval`, typed text shown as plain text), when it removed a
    concept, and why a compared method is left out (e.g. CoOp beyond its cost budget)."""
    if outcome.concept is not None:
        st.info(f"{plain(outcome.concept.sentence())} The table compares it with the same fit keeping the concept "
                "(“concept kept”).", icon=":material/content_cut:")
    for why in outcome.left_out.values():
        st.caption(plain(why))


def verdict_table(verdict: EditVerdict) -> None:
    """Every group and class the guard tested, before → after on the same held-out images."""
    number = st.column_config.NumberColumn
    table("guard", pd.DataFrame(verdict_rows(verdict.to_dict(), numeric=True)), hide_index=True,
          column_config={"change (pts)": number(format="%+.1f"), "can have lost (pts)": number(format="%.1f")})
    st.caption("Change: the edit minus zero-shot on the same held-out images, with Newcombe's paired 95% interval "
               "(the one interval of that number, also in the verdict); worse (Holm): significantly worse by an exact "
               "McNemar test after Holm's correction over every group and class tested; can have lost: the verdict's "
               "cautious bound on the drop (all bounds holding together at 95%), not an interval of the change. "
               "docs/GUARD.md says what the guard promises and what it cannot know.")


def checkpoint_download(col, checkpoint: Path | None, exported: str, verdict: EditVerdict) -> None:
    """The merged checkpoint's download button: the open_clip file, or the transformers folder zipped.
    An edit the guard did not verify needs one explicit confirmation first."""
    worse = {VERIFIED: "verified", HARMFUL: "harmful"}.get(verdict.status, "not verified")
    if verdict.status != VERIFIED and not col.checkbox(
            f"Download anyway ({verdict.status})", key=Key.REFINE_CONFIRM,
            help=f"The guard called this edit {verdict.status}: tick to confirm you read why and want it anyway."):
        col.caption("The guard did not verify this edit; tick the box above to download it anyway.")
        return
    if checkpoint is not None and checkpoint.is_dir():
        col.download_button(f"Merged checkpoint ({worse}): {exported}, Hugging Face folder (.zip)",
                            data=lambda p=checkpoint: zip_folder(p), file_name=f"{checkpoint.name}.zip",
                            mime="application/zip", key="ref_dl_ckpt", icon=":material/download:", on_click="ignore",
                            help="Unzip it: transformers' CLIPModel.from_pretrained(<folder>) loads the edited model, "
                                 "and so does this dashboard's 'Local checkpoint'.")
    elif checkpoint is not None and checkpoint.is_file():
        col.download_button(f"Merged checkpoint ({worse}): {exported} (.safetensors)",
                            data=lambda p=checkpoint: p.read_bytes(), file_name=checkpoint.name,
                            mime="application/octet-stream", key="ref_dl_ckpt", icon=":material/download:",
                            on_click="ignore",  # a download needs no rerun (and a rerun can race the deferred data)
                            help="open_clip.create_model(name, pretrained=<this file>) loads the edited model.")
    else:
        col.caption("The exported checkpoint is gone (temporary files were cleaned); run the refinement again.")


def _on_map_click(key: str) -> None:
    state = get(key)
    points = (state or {}).get("selection", {}).get("points", []) if state else []
    if points:
        p = points[0]
        set_inspect_head(HeadId.of((p["y"], p["x"])))  # x = head, y = layer


def score_maps_panel(ident: Identification, n_heads: int, selected: HeadId | None, chosen_by: str) -> None:
    """The Heads page's DE_A..DE_D maps (Eq. 6-9), one error pair's at a time (a segmented control picks the
    pair when there are two: half the charts for the browser to draw); a click on a square selects the head
    the inspector shows."""
    names = list(ident.scores)
    pairs = list(dict.fromkeys(k.pair for k in names))
    shown = names
    if len(pairs) > 1:
        at = st.segmented_control("Score maps of the error pair", range(len(pairs)), default=0, key="heads_map_pair",
                                  format_func=lambda i: visible(f"{pairs[i][0]}→{pairs[i][1]}"),
                                  help="Each pair has its own W, C and A sets, so its own scores; the chosen set "
                                       "(white dots) is common to all.")
        shown = [k for k in names if k.pair == pairs[at or 0]]
    for start in range(0, len(shown), 2):
        for col, name in zip(st.columns(2), shown[start:start + 2]):
            s = ident.scores[name]
            with col:
                if not s.available:
                    st.markdown(f"**{plain(name)}**")  # score names carry the pair's class names
                    outer = SCORE_SPECS[name.score][0]
                    st.info(f"{plain(name)} is unavailable: {plain(s.reason or f'set {outer} is empty')}. It averages "
                            f"over set {outer}; draw more samples or pick another pair to fill it.",
                            icon=":material/info:")
                    continue
                key = Key.score_map(names.index(name))
                fig = resources.score_map(s.values, s.layers, str(name), s.descending, ident.heads, selected, n_heads,
                                          chosen_by)
                st.plotly_chart(fig, key=key, on_select=lambda key=key: _on_map_click(key), selection_mode="points",
                                width="content", theme=None, config={"displayModeBar": False})
                if s.reason:
                    st.caption(plain(s.reason))
