"""How chat messages become a prompt for a base model: a plain Portuguese dialogue, documented and versioned.

The model was trained on books, not on conversations, so a chat is rendered as the
script of a dialogue that the model continues:

    {system}                      (when there is a system message)

    Usuário: {user message}
    Assistente: {assistant message}
    Usuário: {user message}
    Assistente:

and generation stops before the model writes the next "Usuário:" line. The template is
stored with the run (`chat_template.json` in the run folder, written by `train`; `RunDir.chat_template_path`), so a
run is always served with the template it was published with; runs from before that
file existed get `DEFAULT`. Every chat response names the template it used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from gtransformer.errors import UserError
from gtransformer.files import write_text_atomic


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    user_prefix: str
    assistant_prefix: str
    turn_separator: str
    system_separator: str
    stop: tuple[str, ...]

    def render(self, messages: list[tuple[str, str]]) -> str:
        """(role, content) pairs -> the prompt, ending where the assistant's next turn starts."""
        system = "\n".join(content.strip() for role, content in messages if role == "system")
        turns = []
        for role, content in messages:
            if role == "user":
                turns.append(f"{self.user_prefix}{content.strip()}")
            elif role == "assistant":
                turns.append(f"{self.assistant_prefix}{content.strip()}")
        turns.append(self.assistant_prefix.rstrip())
        dialogue = self.turn_separator.join(turns)
        return f"{system}{self.system_separator}{dialogue}" if system else dialogue

    def save(self, path: Path) -> None:
        write_text_atomic(path, json.dumps({**asdict(self), "stop": list(self.stop)}, ensure_ascii=False, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ChatTemplate":
        """The template saved at `path`, or DEFAULT when there is none."""
        if not path.is_file():
            return DEFAULT
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{**values, "stop": tuple(values["stop"])})
        except (ValueError, TypeError, KeyError) as exc:
            raise UserError(f"{path} is not a chat template ({exc}); delete it to use the default") from None


DEFAULT = ChatTemplate(
    name="gtransformer-dialogo-v1",
    user_prefix="Usuário: ",
    assistant_prefix="Assistente: ",
    turn_separator="\n",
    system_separator="\n\n",
    stop=("\nUsuário:", "\nAssistente:"),
)
