"""`olavlm chat` on a tiny trained model: the reply is the greedy decode of the model itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from olavlm.cli import main as cli_main
from olavlm.config import load_config
from olavlm.infer.chat import ChatSession
from olavlm.train.loop import train
from olavlm.devkit.smoke import smoke_overrides

IFT = Path("configs/phi3_mini_clip336/ift.yaml")


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    torch.set_num_threads(1)
    cfg = load_config(IFT, smoke_overrides(tiny_dir, IFT, root) + ["--train.init_from=null"])
    result = train(cfg, resume="none")
    return result.final_dir, root / "data" / "images" / "001.png"


def _greedy_without_cache(session: ChatSession, text: str, n: int) -> list[int]:
    """Independent decode: full forward over the growing sequence, argmax of the last logits."""
    seq, out = session.prompt_ids(text), []
    for _ in range(n):
        logits = session.model(input_ids=torch.tensor([seq]), pixel_values=session.pixel_values,
                               return_logits=True).logits
        token = int(logits[0, -1].argmax())
        if token in session.stop_ids:
            break
        out.append(token)
        seq.append(token)
    return out


def test_chat_reply_is_the_models_greedy_decode(trained):
    final, image = trained
    session = ChatSession(final, device="cpu")
    assert session.template == "llava_phi_3" and session.image_geometry == "pad"
    session.set_image(image)
    assert session.pixel_values.shape == (1, 3, 64, 64)
    reply = session.ask("What is in the image?", max_new_tokens=6)
    expected = _greedy_without_cache(_fresh(session), "What is in the image?", 6)
    assert session.last_ids == expected and len(expected) == 6  # the tiny model never stops early here
    assert reply == session.tokenizer.decode(expected, skip_special_tokens=True).strip()
    # the second turn carries the history (image + first exchange) in the prompt
    ids = session.prompt_ids("And the colour?")
    assert len(ids) > len(_fresh(session).prompt_ids("And the colour?"))


def _fresh(session: ChatSession) -> ChatSession:
    """A shallow copy with an empty history (same model, image and template)."""
    other = object.__new__(ChatSession)
    other.__dict__.update(session.__dict__)
    other.messages = []
    return other


def test_chat_cli_prompt_and_missing_run_info(trained, capsys, tmp_path):
    final, image = trained
    assert cli_main(["chat", "--model", str(final), "--image", str(image), "--prompt", "Describe it.",
                     "--max-new-tokens", "4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    session = ChatSession(final, device="cpu")
    session.set_image(image)
    assert printed == session.ask("Describe it.", max_new_tokens=4) + "\n"
    (final / "olavlm_processor.json").rename(tmp_path / "moved.json")
    try:
        with pytest.raises(ValueError, match="--template and --image-geometry"):
            ChatSession(final)
        assert ChatSession(final, template="llava_phi_3", image_geometry="pad", device="cpu").template == "llava_phi_3"
    finally:
        (tmp_path / "moved.json").rename(final / "olavlm_processor.json")


def test_chat_uses_the_recorded_bos_policy(trained):
    """`olavlm train` records the BOS policy; chat builds its prompts with it, not with a fresh guess."""
    import json

    final, _ = trained
    info_file = final / "olavlm_processor.json"
    info = json.loads(info_file.read_text())
    assert info["add_bos"] is True  # data.add_bos auto + a tokenizer that adds BOS
    session = ChatSession(final, device="cpu")
    with_bos = session.prompt_ids("Hi")
    assert with_bos[0] == session.tokenizer.bos_token_id
    info_file.write_text(json.dumps({**info, "add_bos": False}))
    try:
        assert ChatSession(final, device="cpu").prompt_ids("Hi") == with_bos[1:]
        assert ChatSession(final, device="cpu", add_bos="true").prompt_ids("Hi") == with_bos  # the override
    finally:
        info_file.write_text(json.dumps(info))
