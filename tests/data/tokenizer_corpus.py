"""A fixed, hand-written corpus of tricky strings for tokenizer tests.

Each group targets a place where byte-level BPE pipelines tend to disagree: whitespace runs
(the `\\s+(?!\\S)` rule), digits (split one by one or in threes), contractions and their case,
multi-byte UTF-8 (CJK, emoji with ZWJ and skin tones), and special tokens written in text.
`corpus()` is deterministic: the combinatorial part is built from fixed lists, never random.
"""

from __future__ import annotations

from itertools import product

PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world!",
    "hello world",
    "HELLO WORLD",
    "It was the best of times, it was the worst of times.",
    "Large language models predict the next token, one step at a time.",
    "Paged attention stores the KV cache in fixed-size blocks, like virtual memory.",
    "Continuous batching lets new requests join a running batch between decode steps.",
    'She said: "Don\'t panic." Then she left.',
    "I'm sure they'll say it's fine; we've seen worse, haven't we? You'd agree.",
    "I'M SURE THEY'LL SAY IT'S FINE. WE'VE SEEN WORSE. YOU'D AGREE.",
    "rock 'n' roll, the '90s, and o'clock",
    "A sentence with trailing spaces.   ",
    "   A sentence with leading spaces.",
    "Mr. Smith went to Washington, D.C., on Jan. 3rd.",
    "Café, naïve, résumé, façade, Ångström, jalapeño, Zürich.",
    "e\u0301 is e with a combining acute accent (not precomposed).",
    "Punctuation!!! ??? ... --- ((parens)) [brackets] {braces} <angles>",
    "em—dash, en–dash, ellipsis… and “curly quotes” ‘single’.",
    "Tokenization is the first step; detokenization is the last.",
    "Quantization trades a little accuracy for a lot of memory bandwidth.",
    "What is 2 + 2? The answer is 4.",
    "Thisisaverylongwordwithoutanyspacesinsideitatall",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a",
    "A",
    " ",
    ".",
    "x y z",
    "The end.\n",
]

CODE = [
    "def add(a, b):\n    return a + b\n",
    "def add(a, b):\n\treturn a + b\n",
    "class Foo:\n    def __init__(self):\n        self.x = 1  # comment\n",
    'for i in range(10):\n    print(f"{i:>4d}")\n',
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n",
    'if __name__ == "__main__":\n    main()\n',
    "lambda x: x**2 if x > 0 else -x",
    "    indented = True\n        more_indented = False\n",
    "const add = (a, b) => a + b;\nconsole.log(add(1, 2));",
    "function f() { return [1, 2, 3].map(x => x * 2); }",
    "let s = `template ${literal}`; // comment",
    '#include <stdio.h>\n\nint main(void) {\n    printf("%d\\n", 42);\n    return 0;\n}\n',
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * c; }",
    'fn main() { let v: Vec<u8> = vec![0; 16]; println!("{:?}", v); }',
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "$ pip install -e .[dev] && pytest -x -q tests/",
    '#!/usr/bin/env bash\nset -euo pipefail\necho "$HOME"\n',
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    '<html>\n  <body><p class="x">Hi &amp; bye</p></body>\n</html>',
    "x = {'a': 1, 'b': [True, False, None]}",
    "a==b!=c<=d>=e&&f||g",
    "i++; j--; k **= 2; m //= 3;",
    "    \n    \n",
    "\tdef tabbed():\n\t\tpass\n",
    "matrix = [[1, 2], [3, 4]]  # 2x2",
]

CHINESE = [
    "你好，世界！",
    "大模型推理部署：量化、剪枝、蒸馏。",
    "张量并行（Tensor Parallelism, TP）把一个矩阵切到多张卡上。",
    "今天天气很好，我们去公园散步吧。",
    "我爱北京天安门",
    "这是一个测试句子，包含中文标点符号：，。！？；：“”‘’（）《》",
    "中文和English混合的句子，还有数字123。",
    "繁體中文也應該正確處理。",
    "一二三四五六七八九十",
    "龘靐齉爩",
    "  前面有空格的中文",
    "中文后面有空格  ",
    "中\n文\n换\n行",
    "𠀀𠀁𠀂 (CJK Extension B, four UTF-8 bytes each)",
    "键值缓存（KV Cache）分页管理",
]

JAPANESE_AND_OTHERS = [
    "こんにちは、世界！",
    "日本語のテキストとカタカナ、ひらがな。",
    "東京タワーは333メートルです。",
    "ｶﾀｶﾅ (half-width katakana) と ＡＢＣ (full-width)",
    "私は学生です。",
    "안녕하세요, 세계!",
    "Привет, мир! Как дела?",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Tiếng Việt có dấu: Hà Nội, Sài Gòn.",
    "Łódź, Kraków, Gdańsk; Ærø, Øresund.",
]

EMOJI = [
    "😀",
    "Hello 😀 world",
    "👍👍🏻👍🏼👍🏽👍🏾👍🏿",
    "👨‍👩‍👧‍👦 is one family (ZWJ sequence)",
    "👩🏽‍💻 writes code",
    "🏳️‍🌈 and 🏴‍☠️",
    "🇨🇳🇯🇵🇺🇸🇩🇪 flags",
    "❤️ vs ❤ (variation selector)",
    "1️⃣ 2️⃣ #️⃣ keycaps",
    "🧑‍🤝‍🧑🧑🏻‍🤝‍🧑🏿",
    "emoji😀without😀spaces",
    "😀😃😄😁😆😅😂🤣",
    "🚀🔥✨💯",
    "Math: ∑∫∂√∞≈≠≤≥ and arrows ←↑→↓",
    "Box drawing: ┌─┐│└─┘ and blocks ▁▂▃▄▅▆▇█",
]

NUMBERS = [
    "0",
    "42",
    "1234567890",
    "3.14159",
    "-273.15",
    "1e-10 and 6.022e23",
    "1,000,000",
    "Call 555-123-4567 now",
    "2024-05-17T12:34:56Z",
    "v1.2.3-rc.4",
    "0x1F 0b1010 0o777",
    "a  1",
    "a   123",
    "x\t\t7",
    "costs $19.99 (was $25)",
    "100%  of   1000",
    "Unicode digits: ٠١٢٣ ４５６ ⅠⅡⅢ ½ ²",
    "room 101, floor 7, building 42B",
]

URLS = [
    "https://example.com/path?query=1&other=two#frag",
    "http://localhost:8000/v1/chat/completions",
    "Visit https://github.com/huggingface/tokenizers for more.",
    "mailto:someone@example.org",
    "ftp://files.example.net/pub/file-1.0.tar.gz",
    "/usr/local/bin/python3.11",
    "C:\\Users\\name\\Documents\\file.txt",
    "user@example.com, other.name+tag@sub.domain.co.uk",
    "www.example.com/a/b/c/index.html",
    "127.0.0.1:11434/api/chat",
]

SPECIAL_TOKENS = [
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|endoftext|>",
    "text before<|endoftext|>text after",
    " <|im_start|> spaced <|im_end|> ",
    "<|im_start|><|im_end|><|endoftext|>",
    "<|im_start|>assistant\n你好😀<|im_end|>",
    "<|im_start",
    "|im_end|>",
    "<|im_end|x",
    "< |im_start| >",
    "<|IM_START|>",
    "<repo_name>minillm<file_sep>README.md",
    "<|im_start|>\n\n<|im_end|>\n\n",
]

WHITESPACE = [
    "",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\n\n\n",
    "a\r\nb\r\nc",
    "line1\nline2\r\nline3\rline4",
    "\t \t \t",
    " \n \n ",
    "word\n\n\nword",
    "trailing newline\n",
    "\r\n\r\n\r\n",
    "a\u00a0b (no-break space)",
    "a\u3000b (ideographic space)",
    "zero\u200bwidth\u200bspace",
    "\ufeffBOM at start",
]

# Combinatorial part: words joined by every kind of separator, so every whitespace shape
# meets letters, digits, punctuation and multi-byte characters on both sides.
_WORDS = ["hello", "42", "你好", "😀", "it's", "x=1", "<|im_end|>"]
_SEPARATORS = ["", " ", "  ", "\t", "\n", " \n", "\r\n", "   \n\n"]


def _combinations() -> list[str]:
    pairs = [(a, sep, b) for a, b in product(_WORDS, repeat=2) if a != b for sep in _SEPARATORS]
    # Keep a deterministic, evenly spread subset: every 4th triple.
    return [f"{a}{sep}{b}" for a, sep, b in pairs[::4]]


def _padded() -> list[str]:
    core = ["hi", "你好", "42", "😀"]
    pads = [" ", "  ", "\n", "\t "]
    return [f"{p}{c}{q}" for c, p, q in product(core, pads, pads) if p != q][::3]


def corpus() -> list[str]:
    """All strings, in a fixed order, without duplicates."""
    groups = [
        PROSE,
        CODE,
        CHINESE,
        JAPANESE_AND_OTHERS,
        EMOJI,
        NUMBERS,
        URLS,
        SPECIAL_TOKENS,
        WHITESPACE,
        _combinations(),
        _padded(),
    ]
    seen: dict[str, None] = {}
    for group in groups:
        for text in group:
            seen.setdefault(text, None)
    return list(seen)
