"""The README's API tour runs as written (single process, gloo on CPU)."""

import re
from pathlib import Path

import torch

from lpdist.dist import destroy

README = Path(__file__).resolve().parents[1] / "README.md"


def test_api_tour_runs():
    text = README.read_text()
    tour = text[text.index("## API tour"):]
    code = re.search(r"```python\n(.*?)```", tour, re.S).group(1)
    scope: dict = {}
    try:
        exec(compile(code, "README.md (API tour)", "exec"), scope)
        _train_one_step(scope)
    finally:
        destroy()


def _train_one_step(scope: dict) -> None:
    model, opt = scope["model"], scope["opt"]
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    loss = model(tokens).float().logsumexp(-1).mean()
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    assert scope["q"].nbytes < 1024 * 4096 * 2
