"""Incremental detokenisation with stop strings: text is released only once no stop string can still match it."""
from __future__ import annotations

from server.engine.request import Request


def update_text(req: Request, tokenizer, final: bool) -> tuple[str, bool]:
    """Re-decode the request's output, cut at the first stop string. -> (new text to send, hit a stop string)."""
    text = tokenizer.decode(req.output_ids, skip_special_tokens=True)
    stops = req.params.stop
    hit = False
    if stops:
        search_from = max(0, req.num_text_sent - max(len(s) for s in stops))
        cuts = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
        if cuts:
            text, hit = text[: min(cuts)], True
    req.text = text
    if hit or final:
        end = len(text)
    else:
        # hold back a possible stop-string prefix and an incomplete UTF-8 sequence
        hold = max((len(s) - 1 for s in stops), default=0)
        end = len(text) - hold
        while end > req.num_text_sent and text[end - 1] == "\ufffd":
            end -= 1
    end = max(end, req.num_text_sent)
    new = text[req.num_text_sent : end]
    req.num_text_sent = end
    return new, hit
