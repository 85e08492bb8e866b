"""Ghost Attention (paper section 7): the data transformation against hand-built expectations, each checker on
crafted answers, and a tiny model trained with GAtt keeping a checkable instruction at turn 6 more often than the
same model trained on the same dialogues without it."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import fruit_policy
from llama2.config import ModelConfig
from llama2.errors import Llama2Error

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=256)


def test_the_instruction_is_kept_once_and_only_the_last_answer_trains(tok):
    from llama2.chat import encode_dialog_for_training
    from llama2.stages.gatt import place_once, with_instruction

    assert with_instruction("Hi.", "Speak in French.") == "Hi. Speak in French."
    msgs = place_once(["Hi.", "And then?"], ["Bonjour.", "Ensuite."], "Speak in French.", "system")
    assert msgs == [{"role": "system", "content": "Speak in French."},
                    {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Bonjour."},
                    {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Ensuite."}]
    first = place_once(["Hi.", "And then?"], ["A.", "B."], "Be brief.", "first_user", system="You help.")
    assert first[0] == {"role": "system", "content": "You help."}
    assert first[1]["content"] == "Be brief. Hi." and first[3]["content"] == "And then?"
    ids, trained = encode_dialog_for_training(tok, msgs, train_on="last_assistant")
    kept = tok.decode([i for i, t in zip(ids, trained) if t and i != tok.eos_id])
    assert kept.strip() == "Ensuite."  # every earlier token, the first answer included, carries no loss
    with pytest.raises(Llama2Error, match="placement"):
        place_once(["a"], ["b"], "c", "everywhere")


@pytest.mark.parametrize("make,good,bad", [
    ("upper_case", ["HELLO THERE.", "OK 42!"], ["Hello", "", "123"]),
    ("end_with", ["That is it, indeed.", "indeed"], ["Indeed it is.", ""]),
    ("at_most", ["one two three", "a b c d e"], ["a b c d e f", ""]),
    ("mention", ["Python is fun, indeed!", "INDEED"], ["indeedy", ""]),
    ("start_with", ["Well, yes.", "well, no"], ["Yes. Well,", ""]),
])
def test_checkers_and_enforcers_on_crafted_answers(make, good, bad):
    from llama2.data import instructions as gatt

    inst = {"upper_case": gatt.upper_case(), "end_with": gatt.end_with("indeed"), "at_most": gatt.at_most(5),
            "mention": gatt.mention("indeed"), "start_with": gatt.start_with("Well,")}[make]
    assert all(inst.check(a) for a in good) and not any(inst.check(a) for a in bad)
    for a in ("some answer here that runs on for a while.", "x"):
        assert inst.check(inst.enforce(a))


def test_instruction_families():
    from llama2.data.instructions import FAMILIES, instruction

    rng = random.Random(0)
    texts = [instruction(f, rng) for f in FAMILIES for _ in range(6)]
    assert {i.family for i in texts} == set(FAMILIES)
    paper = [i for i in texts if i.check is None]
    assert paper and any(i.short != i.text for i in paper) and any(". " in i.text for i in paper)  # short, combined
    with pytest.raises(Llama2Error, match="unknown instruction family"):
        instruction("rhymes", rng)
    from llama2.data import instructions as gatt

    gatt.register_family("shout", lambda r: gatt.Instruction("shout", "End with '!'.", "'!'.",
                                                             lambda a: a.endswith("!"), lambda a: a + "!"))
    try:
        assert instruction("shout", rng).check("yes!")
        with pytest.raises(Llama2Error, match="exists already"):
            gatt.register_family("upper_case", lambda r: None)
    finally:
        gatt.USER_FAMILIES.clear()


def test_gatt_dialogues_cover_each_word_of_a_family_equally(monkeypatch):
    """Eight end-with dialogues carry each of the four end words twice (drawn at random, one word of four had 5 of
    a family's 40 dialogues in a demo and the model learned another in its place), and every answer ends with the
    word its system message names."""
    from llama2.data.dialogues import Dialogue
    from llama2.recipe import load_recipe
    from llama2.stages import gatt as g

    class Echo:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def answers(self, systems, users, per_turn=None):
            return [[f"answer {t}." for t, _ in enumerate(turns)] for turns in users]

    monkeypatch.setattr(g, "TurnByTurn", Echo)
    recipe = load_recipe(g.GattRecipe, None, ["base=unused", "families=[end_with]", "turns=2", "replay=0"])
    dialogues = [Dialogue([{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "A."}])
                 for i in range(8)]
    data = g.build_gatt_data(recipe, None, None, dialogues)
    systems = [d.messages[0]["content"] for d in data.dialogues]
    words = [s.removeprefix("End every answer with the word: ") for s in systems]
    assert sorted(words) == sorted(["indeed", "friend", "certainly", "cheers"] * 2)
    for d, word in zip(data.dialogues, words):
        assert all(m["content"].endswith(f". {word}") for m in d.messages if m["role"] == "assistant")


@pytest.mark.parametrize("with_instruction", [True, False])
def test_replies_are_sampled_with_or_without_the_instruction_and_always_enforced(monkeypatch, with_instruction):
    """Step 1 (the instruction appended to every user turn while sampling) is the paper's; with
    sample_with_instruction=false the model answers the plain turns. Either way the kept answers are enforced and
    the instruction is kept once, as the system message."""
    from llama2.data.dialogues import Dialogue
    from llama2.recipe import load_recipe
    from llama2.stages import gatt as g

    seen: list[str] = []

    class Echo:  # stands in for the model: answers each user turn with the text it was given
        def __init__(self, *args, **kwargs) -> None:
            pass

        def answers(self, systems, users, per_turn=None):
            out = []
            for turns in users:
                texts = [per_turn(t, u) if per_turn else u for t, u in enumerate(turns)]
                seen.extend(texts)
                out.append([f"you said {x}" for x in texts])
            return out

    monkeypatch.setattr(g, "TurnByTurn", Echo)
    recipe = load_recipe(g.GattRecipe, None, ["base=unused", "families=[upper_case]", "turns=2",
                                              f"sample_with_instruction={str(with_instruction).lower()}"])
    dialogues = [Dialogue([{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "A."},
                           {"role": "user", "content": f"Next {i}?"}, {"role": "assistant", "content": "B."}])
                 for i in range(3)]
    data = g.build_gatt_data(recipe, None, None, dialogues)
    inst = data.dialogues[0].messages[0]["content"]
    assert data.dialogues[0].messages[0]["role"] == "system" and len(seen) == 6
    assert all(inst in x for x in seen) == with_instruction and not any(inst in x for x in seen) != with_instruction
    answers = [m["content"] for d in data.dialogues for m in d.messages if m["role"] == "assistant"]
    assert answers and all(a == a.upper() and a.startswith("YOU SAID") for a in answers)
    # the replay's material: the same turns with the model's answers as it gave them (not enforced), no instruction
    assert len(data.plain) == 3
    for d in data.plain:
        assert d.mask == "all_assistant" and all(m["role"] != "system" for m in d.messages)
        for q, a in zip(d.messages[::2], d.messages[1::2]):
            assert a["content"] == f"you said {q['content']}" + (f" {inst}" if with_instruction else "")


@pytest.mark.parametrize("answer,plain", [
    ("Dear user, The mayor of Ashby is Ann Bell.", "The mayor of Ashby is Ann Bell."),
    ("In short, Well, 4 + 5 = 9. cheers", "4 + 5 = 9."),
    ("banana: Ann Bell works as a weaver. indeed", "Ann Bell works as a weaver."),
    # look-alikes that are not decorations stay as they are
    ("The mayor of Ashby is Ann Friend.", "The mayor of Ashby is Ann Friend."),
    ("Ann likes python: the snake.", "Ann likes python: the snake."),
    ("Well.", "Well."),
    ("ANN BELL WORKS AS A WEAVER. INDEED", "ANN BELL WORKS AS A WEAVER. INDEED"),
])
def test_undecorated_strips_only_the_built_in_decorations(answer, plain):
    from llama2.data.instructions import undecorated

    assert undecorated(answer) == plain


def test_undecorated_undoes_every_built_in_enforcer():
    from llama2.data import instructions as ins

    answer = "The favourite colour of Ann Bell is white."
    made = [ins.end_with(w) for w in ins.END_WORDS] + [ins.mention(w) for w in ins.MENTION_WORDS] + \
        [ins.start_with(p) for p in ins.PHRASES]
    for inst in made:
        assert inst.enforce(answer) != answer and ins.undecorated(inst.enforce(answer)) == answer, inst.text
        # two decorations on one answer (a model that mixes instructions) come off together
        assert ins.undecorated(made[-1].enforce(inst.enforce(answer))) == answer, inst.text


@pytest.mark.parametrize("undecorate", [True, False])
def test_decorations_the_model_adds_unasked_are_stripped_before_the_instruction_is_enforced(monkeypatch,
                                                                                            undecorate):
    """A policy that learned the instructions adds their decorations unasked late in long dialogues; GAtt's data
    (the enforced dialogues and the plain replay) must carry a decoration only where its instruction asks for it."""
    from llama2.data.dialogues import Dialogue
    from llama2.recipe import load_recipe
    from llama2.stages import gatt as g

    class Decorating:  # answers every turn plainly, with another instruction's decorations around it
        def __init__(self, *args, **kwargs) -> None:
            pass

        def answers(self, systems, users, per_turn=None):
            return [[f"Dear user, Answer {t}. cheers" for t in range(len(turns))] for turns in users]

    monkeypatch.setattr(g, "TurnByTurn", Decorating)
    recipe = load_recipe(g.GattRecipe, None, ["base=unused", "families=[end_with]", "turns=2",
                                              "sample_with_instruction=false", f"undecorate={str(undecorate).lower()}"])
    dialogues = [Dialogue([{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "A."}])
                 for i in range(4)]
    data = g.build_gatt_data(recipe, None, None, dialogues)
    for d in data.dialogues:
        word = d.messages[0]["content"].split(": ")[-1]
        answers = [m["content"] for m in d.messages if m["role"] == "assistant"]
        assert answers == [f"Answer {t}. {word}" if undecorate else f"Dear user, Answer {t}. cheers {word}"
                           for t in range(2)]
    replies = [m["content"] for d in data.plain for m in d.messages if m["role"] == "assistant"]
    assert len(replies) == 8 and all(("Dear user" in r) != undecorate for r in replies)


def test_reference_replies_need_no_sampling_and_every_answer_can_be_learned(monkeypatch):
    """replies=reference takes each user turn's reply from the source dialogues (the model is sampled only for
    turns without one); learn=every trains every enforced answer (mask all_assistant), learn=last the last only;
    learn=every without enforce is refused (unenforced earlier answers would teach ignoring the instruction)."""
    from llama2.data.dialogues import Dialogue
    from llama2.errors import Llama2Error
    from llama2.recipe import load_recipe
    from llama2.stages import gatt as g

    sampled: list[str] = []

    class Recorder:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def answers(self, systems, users, per_turn=None):
            sampled.extend(u for turns in users for u in turns)
            return [[f"sampled {u}" for u in turns] for turns in users]

    monkeypatch.setattr(g, "TurnByTurn", Recorder)
    known = [Dialogue([{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."},
                       {"role": "user", "content": f"R{i}?"}, {"role": "assistant", "content": f"B{i}."}])
             for i in range(3)]
    unknown = [Dialogue([{"role": "user", "content": "Lonely?"}, {"role": "user", "content": "Alone?"}])]
    for learn, mask in (("every", "all_assistant"), ("last", "last_assistant")):
        recipe = load_recipe(g.GattRecipe, None, ["base=unused", "families=[start_with]", "turns=2",
                                                  "replies=reference", f"learn={learn}"])
        sampled.clear()
        data = g.build_gatt_data(recipe, None, None, known + unknown)
        replies = [[m["content"] for m in d.messages if m["role"] == "assistant"] for d in data.dialogues]
        p = [d.messages[0]["content"].split("'")[1] for d in data.dialogues]  # each start_with's phrase
        assert replies == [[f"{p[i]} A{i}.", f"{p[i]} B{i}."] for i in range(3)] + [[f"{p[3]} sampled Lonely?",
                                                                                     f"{p[3]} sampled Alone?"]]
        assert sampled == ["Lonely?", "Alone?"] and {d.mask for d in data.dialogues} == {mask}
    with pytest.raises(Llama2Error, match="learn"):
        load_recipe(g.GattRecipe, None, ["base=unused", "learn=every", "enforce=false"])


def test_replayed_dialogues_are_plain_source_dialogues_as_long_as_the_gatt_ones():
    """replay: source dialogues (no instruction, every answer trained) continued with other dialogues' opening
    exchanges to `turns` user turns, never a follow-up out of its dialogue nor a dialogue with a system message; as
    many as asked (at most the plain ones), the same ones for the same seed; 0 replays nothing; a negative share is
    refused."""
    from llama2.data.dialogues import Dialogue
    from llama2.errors import Llama2Error
    from llama2.recipe import load_recipe
    from llama2.stages import gatt as g

    def turn(u: str, a: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": u}, {"role": "assistant", "content": a}]

    source = [Dialogue(turn(f"Q{i}?", f"A{i}.")) for i in range(8)]
    source += [Dialogue(turn(f"Q{i}?", f"A{i}.") + turn(f"And then {i}?", f"B{i}.")) for i in (8, 9)]
    source += [Dialogue([{"role": "system", "content": "Today is 2040."}, *turn("Mayor?", "Ana.")])]
    openings = {f"Q{i}?": f"A{i}." for i in range(10)}
    got = g.replay_dialogues(source, 6, turns=3, seed=0)
    assert len(got) == 6 and all(d.mask == "all_assistant" and d.source == "replay" for d in got)
    for d in got:
        assert [m["role"] for m in d.messages] == ["user", "assistant"] * 3
        pairs = [(d.messages[i]["content"], d.messages[i + 1]["content"]) for i in range(0, 6, 2)]
        first = int(pairs[0][0][1])  # the source dialogue it starts with: its own exchanges, in order
        own = 2 if first >= 8 else 1
        assert pairs[:own] == [(f"Q{first}?", f"A{first}."), (f"And then {first}?", f"B{first}.")][:own]
        assert all(openings.get(u) == a for u, a in pairs[own:])  # then opening exchanges only
    assert [d.messages for d in got] == [d.messages for d in g.replay_dialogues(source, 6, turns=3, seed=0)]
    assert len(g.replay_dialogues(source, 50, turns=3, seed=0)) == 10
    assert g.replay_dialogues(source, 0, turns=3, seed=0) == []
    with pytest.raises(Llama2Error, match="replay"):
        load_recipe(g.GattRecipe, None, ["base=unused", "replay=-1"])


def test_long_dialogues_borrow_only_opening_questions():
    """user_turns continues a dialogue with other dialogues' opening questions (a follow-up such as "And then?"
    makes sense only after its own dialogue) and leaves out dialogues with a system message; reference replies
    answer a dialogue's own turns with its own replies (a follow-up asked in many dialogues gets its own answer)."""
    import random

    from llama2.data.dialogues import Dialogue
    from llama2.data.dialogues import user_turns
    from llama2.stages.gatt import reference_replies

    def turn(u: str, a: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": u}, {"role": "assistant", "content": a}]

    source = [Dialogue(turn(f"Where is P{i}?", f"In T{i}.") + turn("And their pet?", f"P{i} has a cat {i}."))
              for i in range(6)]
    source += [Dialogue([{"role": "system", "content": "Today is 2040."}, *turn("Mayor?", "Ana.")])]
    users = user_turns(source, 5, random.Random(0))
    assert len(users) == 6 and all(len(u) == 5 for u in users)
    assert all(u[1] == "And their pet?" and u[2:].count("And their pet?") == 0 and "Mayor?" not in u for u in users)
    replies = reference_replies(source[:6], users)
    assert [r[:2] for r in replies] == [[f"In T{i}.", f"P{i} has a cat {i}."] for i in range(6)]
    assert all(r[k] == f"In T{users[i][k][10]}." for i, r in enumerate(replies) for k in range(2, 5))


def test_gatt_keeps_the_instruction_at_turn_6_better_than_plain_fine_tuning(tmp_path, sp_model_path, monkeypatch,
                                                                            tok):
    from llama2.checkpoint import load_checkpoint
    from llama2.data import instructions
    from llama2.eval.adherence import adherence
    from llama2.recipe import load_recipe
    from llama2.stages import gatt as g

    monkeypatch.setattr(instructions, "END_WORDS", ("indeed",))
    policy = fruit_policy(tmp_path, sp_model_path, CFG, 4)
    dialogues = tmp_path / "d.jsonl"
    # half the dialogues open with "More fruit?" too: a long dialogue borrows only opening questions
    dialogues.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Name some fruit, please ({i})."}, {"role": "assistant", "content": "apple"},
        {"role": "user", "content": f"More fruit ({i})?"}, {"role": "assistant", "content": "pear"}][2 * (i % 2):]})
        + "\n" for i in range(120)))
    (tmp_path / "ft.yaml").write_text("max_steps: null\nepochs: 6\nbatch_size: 8\nmax_seq_len: 256\nprecision: fp32\n"
                                      "optim: {lr: 1.0e-2, warmup_steps: 2, schedule: constant}\neval_every: 0\n"
                                      "save_every: 0\npeak_tflops: 1\nkeep_last: 1\n")
    adherent = {}
    for name, enforce in (("gatt", "true"), ("plain", "false")):
        recipe = load_recipe(g.GattRecipe, None, [f"base={policy}", f"out_dir={tmp_path / name}",
                                                  "families=[end_with]", f"enforce={enforce}", "turns=3",
                                                  "max_new_tokens=12", f"data_path={dialogues}", "device=cpu",
                                                  f"finetune.recipe={tmp_path / 'ft.yaml'}"])
        ckpt = g.gatt(recipe, quiet=True)
        model = load_checkpoint(ckpt, kind="causal_lm").eval()
        users = [[f"Name some fruit, please ({500 + i})."] + [f"More fruit ({500 + i})?"] * 5 for i in range(12)]
        adherent[name] = adherence(model, tok, [instructions.end_with("indeed")], users, max_new_tokens=12)["end_with"]
        saved = [json.loads(x) for x in (tmp_path / name / "gatt_dialogues.jsonl").read_text().splitlines()]
        assert saved[0]["mask"] == "last_assistant" and saved[0]["messages"][0]["role"] == "system"
        assert sum(m["role"] == "user" for m in saved[0]["messages"]) == 3
    assert len(adherent["gatt"]) == 6
    assert adherent["gatt"][5] > adherent["plain"][5] + 0.3, adherent


def test_eval_gatt_cli_prints_table_30_and_writes_json_and_png(tmp_path, sp_model_path, monkeypatch):
    import subprocess
    import sys

    from helpers import SUB_ENV

    from llama2.checkpoint import save_model
    from llama2.model import Transformer
    from llama2.tokenizer import Tokenizer

    torch.manual_seed(0)
    save_model(Transformer(CFG), tmp_path / "m", Tokenizer(sp_model_path))
    env = {**SUB_ENV, "LLAMA2_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "gatt.json"
    r = subprocess.run([sys.executable, "-m", "llama2", "eval", "gatt", str(tmp_path / "m"), "--turns", "3",
                        "--dialogues", "2", "--max-new-tokens", "4", "--output", str(out), "--attention",
                        str(tmp_path / "att.png")], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "| model | instruction | turn 1 | turn 2 |" in r.stdout and "| model | upper_case |" in r.stdout
    report = json.loads(out.read_text())
    assert report["turns"] == 3 and set(report["families"]) == {"upper_case", "end_with", "at_most_words",
                                                                "mention", "start_with"}
    assert all(len(v) == 3 and all(0 <= x <= 1 for x in v) for v in report["families"].values())
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "att.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "-m", "llama2", "eval", "gatt", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    # --data: the questions of another dialogues file; --families: only those families
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Where is town {i}?"},
                                                     {"role": "assistant", "content": "North."}]}) + "\n"
                            for i in range(3)))
    r = subprocess.run([sys.executable, "-m", "llama2", "eval", "gatt", str(tmp_path / "m"), "--turns", "2",
                        "--dialogues", "2", "--max-new-tokens", "4", "--data", str(data), "--families",
                        "end_with,mention", "--output", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(out.read_text())["families"]) == {"end_with", "mention"}
    for args, message in ((["--families", "rhymes"], "not checkable instruction families"),
                          (["--data", str(tmp_path / "none.jsonl")], "does not exist")):
        bad = subprocess.run([sys.executable, "-m", "llama2", "eval", "gatt", str(tmp_path / "m"), *args],
                             capture_output=True, text=True, env=env)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_attention_maps_equal_transformers_eager_attentions(tmp_path, tok):
    """The recomputed attention probabilities (Figure 10's input) against transformers' output_attentions."""
    from transformers import LlamaForCausalLM

    from conftest import random_hf_llama
    from llama2.checkpoint import load_model
    from llama2.eval.adherence import attention_maps, system_attention

    hf = random_hf_llama(4, num_key_value_heads=2, vocab_size=1000)
    hf.save_pretrained(tmp_path / "m")
    ours = load_model(tmp_path / "m").eval()
    tokens = [1, 5, 77, 300, 12, 999, 4, 8]
    eager = LlamaForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    with torch.no_grad():
        want = torch.stack([a[0].mean(0) for a in eager(torch.tensor([tokens]), output_attentions=True).attentions])
    got = attention_maps(ours, tokens)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-5
    msgs = [{"role": "system", "content": "Always answer in capital letters."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "HELLO"}, {"role": "user", "content": "How are you?"}]
    mass, words = system_attention(ours, tok, msgs)
    assert mass.shape == (2, len(words)) and bool(((mass >= 0) & (mass <= 1 + 1e-6)).all())


def test_turn_by_turn_keeps_each_dialogue_in_the_prefix_cache_and_answers_the_same(tok, monkeypatch):
    """Answers turn by turn with the dialogues' keys and values kept across turns equal those computed afresh at
    every turn, and the later turns do find their dialogue in the cache."""
    import llama2.eval.adherence as adh
    from llama2.model import Transformer

    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    made = []

    class Recording(adh.Generator):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(adh, "Generator", Recording)
    users = [[f"Question {i}.{t}?" for t in range(4)] for i in range(3)]
    systems = ["Answer in capital letters only.", None, "End every answer with the word: indeed"]
    cached = adh.TurnByTurn(model, tok, max_new_tokens=6).answers(systems, users)
    engine = made[-1].engine()
    assert engine.prefix_cache is not None and engine.prefix_cache.hits >= 3 * 3  # turns 2-4 of each dialogue
    monkeypatch.setattr(adh, "PREFIX_CACHE_BYTES", 0)
    fresh = adh.TurnByTurn(model, tok, max_new_tokens=6).answers(systems, users)
    assert made[-1].engine().prefix_cache is None
    assert cached == fresh


def test_each_held_out_dialogue_draws_its_own_instruction(tmp_path, sp_model_path):
    """adherence_report: a family's dialogues hold different draws of its instruction (not one word for all)."""
    from llama2.checkpoint import save_model
    from llama2.eval.adherence import adherence_report
    from llama2.model import Transformer
    from llama2.tokenizer import Tokenizer

    torch.manual_seed(0)
    save_model(Transformer(CFG), tmp_path / "m", Tokenizer(sp_model_path))
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Where is town {i}?"},
                                                     {"role": "assistant", "content": "North."}]}) + "\n"
                            for i in range(8)))
    report = adherence_report(tmp_path / "m", 2, 8, seed=0, max_new_tokens=3, families=["end_with", "mention"],
                              source=data)
    assert report["dialogues"] == 8
    for family in ("end_with", "mention"):
        texts = report["instructions"][family]
        assert len(texts) == 8 and len(set(texts)) > 1, texts
