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

    def to_jinja(self) -> str:
        """`render` as a Jinja chat template (GGUF's `tokenizer.chat_template`, read by llama-server and LM Studio).

        Same prompt as `render` for system/user/assistant messages; with `add_generation_prompt` false the
        assistant's opening is left off."""
        quote = _quoted
        return (
            "{%- set ns = namespace(system='', turns='') -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'system' -%}"
            "{%- set ns.system = ns.system + ('\\n' if ns.system else '') + (message['content'] | trim) -%}"
            "{%- elif message['role'] == 'user' -%}"
            f"{{%- set ns.turns = ns.turns + {quote(self.user_prefix)} + (message['content'] | trim) + "
            f"{quote(self.turn_separator)} -%}}"
            "{%- elif message['role'] == 'assistant' -%}"
            f"{{%- set ns.turns = ns.turns + {quote(self.assistant_prefix)} + (message['content'] | trim) + "
            f"{quote(self.turn_separator)} -%}}"
            "{%- endif -%}"
            "{%- endfor -%}"
            f"{{%- if ns.system %}}{{{{ ns.system + {quote(self.system_separator)} }}}}{{% endif -%}}"
            "{{ ns.turns }}"
            f"{{%- if add_generation_prompt %}}{{{{ {quote(self.assistant_prefix.rstrip())} }}}}{{% endif -%}}"
        )

    def to_go_template(self) -> str:
        """`render` as an Ollama TEMPLATE (Go text/template over `.Messages`).

        Ollama puts every message in `.Messages`, the Modelfile's SYSTEM included as a first system message; the
        system ones are joined with a newline as `render` does (Ollama itself merges consecutive messages of one
        role with a blank line first). Message text is used as sent: Go templates have no trim."""
        quote = _quoted
        return (
            '{{- $system := "" }}'
            '{{- range .Messages }}{{ if eq .Role "system" }}'
            '{{ if $system }}{{ $system = printf "%s\\n%s" $system .Content }}{{ else }}{{ $system = .Content }}{{ end }}'
            "{{ end }}{{ end }}"
            f"{{{{- if $system }}}}{{{{ $system }}}}{{{{ {quote(self.system_separator)} }}}}{{{{ end }}}}"
            "{{- range .Messages }}"
            f'{{{{- if eq .Role "user" }}}}{{{{ {quote(self.user_prefix)} }}}}{{{{ .Content }}}}'
            f'{{{{ {quote(self.turn_separator)} }}}}'
            f'{{{{- else if eq .Role "assistant" }}}}{{{{ {quote(self.assistant_prefix)} }}}}{{{{ .Content }}}}'
            f'{{{{ {quote(self.turn_separator)} }}}}'
            "{{- end }}"
            "{{- end }}"
            f"{{{{ {quote(self.assistant_prefix.rstrip())} }}}}"
        )

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


def _quoted(text: str) -> str:
    """`text` as a double-quoted string literal that Jinja and Go templates both read back as `text`."""
    return json.dumps(text, ensure_ascii=False)


DEFAULT = ChatTemplate(
    name="gtransformer-dialogo-v1",
    user_prefix="Usuário: ",
    assistant_prefix="Assistente: ",
    turn_separator="\n",
    system_separator="\n\n",
    stop=("\nUsuário:", "\nAssistente:"),
)
