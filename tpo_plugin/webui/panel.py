"""TPO in LLaMA-Factory's web UI (LlamaBoard): the TPO settings panel, its labels, and its training arguments.

:mod:`tpo_plugin.integration.patches` hooks these pieces into LLaMA-Factory's UI; this module knows nothing of
LLaMA-Factory's UI internals. It is imported only when LLaMA-Factory loads its web UI, never at start-up,
and imports gradio only inside the functions that need it.

The controls, their defaults and choices, and the English help texts come from the ``tpo_*`` fields of
:class:`tpo_plugin.hparams.tpo_args.TPOArguments`, so the UI and the YAML keys cannot disagree.
"""

import re
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Callable

from ..hparams.tpo_args import (
    CORRUPTIONS,
    NOISE_SCHEDULES,
    REWARD_SIDES,
    SCORE_KINDS,
    WEIGHTINGS,
    TPOArguments,
    tpo_defaults,
)
from ..method.noise import NUM_NOISE_STEPS


if TYPE_CHECKING:
    from gradio.components import Component

TPO_KEYS = tuple(tpo_defaults())
# LLaMA-Factory's RLHF panel keys that TPO reads exactly as DPO does.
PREF_KEYS = ("pref_beta", "pref_ftx", "pref_loss")
LANGUAGES = ("en", "ru", "zh", "ko", "ja")

_FIELD_TYPES = {f.name: f.type for f in fields(TPOArguments)}
_HELP = {f.name: f.metadata["help"] for f in fields(TPOArguments)}


def create_tpo_tab() -> dict[str, "Component"]:
    """Build the closed "TPO configurations" accordion; labels come from :data:`LOCALES` when the page loads."""
    import gradio as gr

    defaults = tpo_defaults()
    with gr.Accordion(open=False) as tpo_tab:
        tpo_info = gr.Markdown()
        with gr.Row():
            controls = dict(
                tpo_noise_step=gr.Slider(
                    minimum=0, maximum=NUM_NOISE_STEPS - 1, step=1, precision=0, value=defaults["tpo_noise_step"]
                ),
                tpo_corruption=gr.Dropdown(choices=list(CORRUPTIONS), value=defaults["tpo_corruption"]),
                tpo_reward_on=gr.Dropdown(choices=list(REWARD_SIDES), value=defaults["tpo_reward_on"]),
                tpo_reward_offset=gr.Number(minimum=0, step=0.05, value=defaults["tpo_reward_offset"]),
                tpo_score=gr.Dropdown(choices=list(SCORE_KINDS), value=defaults["tpo_score"]),
                tpo_detach_reward=gr.Checkbox(value=defaults["tpo_detach_reward"]),
                tpo_weighting=gr.Dropdown(choices=list(WEIGHTINGS), value=defaults["tpo_weighting"]),
                tpo_weight_clip=gr.Number(minimum=0, step=0.01, value=defaults["tpo_weight_clip"]),
                tpo_conditional_weight=gr.Number(minimum=0, step=0.1, value=defaults["tpo_conditional_weight"]),
                tpo_anchor_weight=gr.Number(minimum=0, step=0.1, value=defaults["tpo_anchor_weight"]),
                tpo_noise_per=gr.Dropdown(choices=list(NOISE_SCHEDULES), value=defaults["tpo_noise_per"]),
                tpo_precompute_ref=gr.Checkbox(value=defaults["tpo_precompute_ref"]),
                tpo_allow_changed_settings=gr.Checkbox(value=defaults["tpo_allow_changed_settings"]),
                tpo_log_tokens=gr.Number(minimum=0, step=1, precision=0, value=defaults["tpo_log_tokens"]),
            )

    return dict(tpo_tab=tpo_tab, tpo_info=tpo_info, **controls)


def input_elems(tpo_elems: dict[str, "Component"]) -> set["Component"]:
    """The panel's value-holding controls: those preview, save/load and start must read."""
    return {tpo_elems[key] for key in TPO_KEYS}


def toggle_tpo_tab(stage: str) -> Any:
    """Open the TPO panel when TPO is the chosen stage (given as LLaMA-Factory's stage key), close it otherwise."""
    import gradio as gr

    return gr.Accordion(open=stage == "tpo")


def tpo_train_args(get: Callable[[str], Any]) -> dict[str, Any]:
    """The arguments a TPO run takes from the UI: the RLHF panel's ``pref_*`` values, as LLaMA-Factory passes
    them for DPO, and the TPO panel's ``tpo_*`` values as their YAML types (gradio hands numbers as floats)."""
    args = {key: get(f"train.{key}") for key in PREF_KEYS}
    for key in TPO_KEYS:
        value, kind = get(f"train.{key}"), _FIELD_TYPES[key]
        args[key] = kind(value) if kind in (int, float, bool) and value is not None else value
    return args


def check_tpo_args(args: dict[str, Any]) -> str:
    """The message the CLI would refuse these training arguments with before training, or "" if none.

    Runs the CLI's own checks on what the UI process can see cheaply: the fine-tuning and data arguments,
    whether the datasets are ranking datasets, and the template; nothing is loaded. Whether the pairs have
    images shows only once the data is loaded: the training process checks that before it loads the model,
    and its message reaches the output box.
    """
    from ..training.checks.data import check_data_arguments

    try:
        check_data_arguments(_parse_tpo_args(args))
        _check_template(args.get("template"))
    except ValueError as err:
        return str(err)
    return ""


def _parse_tpo_args(args: dict[str, Any]) -> Any:
    """Validate as LLaMA-Factory's parser does (``tpo_*`` ranges, TPO's refused options); return the data args."""
    from llamafactory.hparams import DataArguments
    from transformers import HfArgumentParser

    from ..hparams.tpo_args import TPOFinetuningArguments

    data_args, _ = HfArgumentParser([DataArguments, TPOFinetuningArguments]).parse_dict(args, allow_extra_keys=True)
    return data_args


def _check_template(template_name: str | None) -> None:
    """A template without an image plugin cannot feed images to the model (unknown names: left to the CLI)."""
    from llamafactory.data import TEMPLATES

    from ..training.checks.data import check_image_template

    if template_name in TEMPLATES:
        check_image_template(TEMPLATES[template_name], template_name)


def _english_help(key: str) -> str:
    """The YAML key's help text, without its pointers into docs/method.md, which a tooltip cannot link."""
    return re.sub(r" \(docs/method\.md[^)]*\)", "", _HELP[key])


# label and info of each panel element, in LlamaBoard's five languages; English help is the YAML help text.
_TEXTS: dict[str, dict[str, tuple[str, ...]]] = {
    "tpo_tab": {
        "en": ("TPO configurations",),
        "ru": ("Конфигурации TPO",),
        "zh": ("TPO 参数设置",),
        "ko": ("TPO 구성",),
        "ja": ("TPO 設定",),
    },
    "tpo_noise_step": {
        "en": ("Noise step", _english_help("tpo_noise_step")),
        "ru": ("Шаг шума", "Шаг диффузии k при искажении изображения, целое число от 0 до 999. По умолчанию 500."),
        "zh": ("加噪步数", "破坏图像所用的扩散步数 k，取值为 0-999 的整数。默认 500。"),
        "ko": ("노이즈 단계", "이미지 손상에 사용하는 확산 단계 k, 0-999 사이의 정수. 기본값 500."),
        "ja": ("ノイズステップ", "画像の破損に用いる拡散ステップ k（0〜999 の整数）。デフォルトは 500。"),
    },
    "tpo_corruption": {
        "en": ("Image corruption", _english_help("tpo_corruption")),
        "ru": (
            "Искажение изображения",
            "Как искажается изображение: `diffusion` — диффузионный шум на шаге tpo_noise_step, `blank` — белое "
            "изображение того же размера. По умолчанию diffusion.",
        ),
        "zh": (
            "图像破坏方式",
            "图像的破坏方式：`diffusion` 在第 tpo_noise_step 步加入扩散噪声，`blank` 使用同尺寸的白色图像。"
            "默认 diffusion。",
        ),
        "ko": (
            "이미지 손상 방식",
            "이미지를 손상시키는 방법: `diffusion`은 tpo_noise_step 단계의 확산 노이즈, `blank`는 같은 크기의 흰색 "
            "이미지. 기본값 diffusion.",
        ),
        "ja": (
            "画像の破損方法",
            "画像の破損方法：`diffusion` は tpo_noise_step ステップの拡散ノイズ、`blank` は同じサイズの白い画像。"
            "デフォルトは diffusion。",
        ),
    },
    "tpo_reward_on": {
        "en": ("Weighted responses", _english_help("tpo_reward_on")),
        "ru": (
            "Взвешиваемые ответы",
            "Какой ответ получает веса токенов: `both` (оба), `chosen` (предпочтительный) или `rejected` "
            "(отвергнутый); токены другого ответа получают вес 1; `none` — вес 1 у всех токенов (отступ DPO). "
            "По умолчанию both.",
        ),
        "zh": (
            "加权的回答",
            "哪一侧回答使用 token 权重：`both`（两者）、`chosen`（优选回答）或 `rejected`（拒绝回答）；"
            "另一侧的 token 权重为 1；`none` 表示所有 token 权重均为 1（即 DPO 的间隔）。默认 both。",
        ),
        "ko": (
            "가중치 적용 응답",
            "토큰 가중치를 받을 응답: `both`(둘 다), `chosen`(선호 응답) 또는 `rejected`(거부 응답). 다른 쪽 "
            "토큰의 가중치는 1입니다. `none`: 모든 토큰 가중치 1(DPO의 마진). 기본값 both.",
        ),
        "ja": (
            "重み付けする応答",
            "トークン重みを付ける応答：`both`（両方）、`chosen`（選好応答）、`rejected`（却下応答）。"
            "もう一方のトークンの重みは 1。`none` はすべてのトークンの重みが 1（DPO のマージン）。デフォルトは both。",
        ),
    },
    "tpo_reward_offset": {
        "en": ("Weight offset", _english_help("tpo_reward_offset")),
        "ru": ("Смещение веса", "Смещение a в весе токена c = a + sigmoid(±s), число >= 0. По умолчанию 0.5."),
        "zh": ("权重偏移", "token 权重 c = a + sigmoid(±s) 中的偏移量 a，取值 >= 0 的浮点数。默认 0.5。"),
        "ko": ("가중치 오프셋", "토큰 가중치 c = a + sigmoid(±s)의 오프셋 a, 0 이상의 실수. 기본값 0.5."),
        "ja": (
            "重みオフセット",
            "トークン重み c = a + sigmoid(±s) のオフセット a（0 以上の実数）。デフォルトは 0.5。",
        ),
    },
    "tpo_score": {
        "en": ("Visual score", _english_help("tpo_score")),
        "ru": (
            "Визуальная оценка",
            "Что визуальная оценка сравнивает между чистым и искажённым изображением: сырой `logit` целевого токена "
            "(как в эталонном коде) или его `logprob`. По умолчанию logit.",
        ),
        "zh": (
            "视觉分数",
            "视觉分数在原始图像与破坏图像之间比较的量：目标 token 的原始 `logit`（参考实现）或其 `logprob`。"
            "默认 logit。",
        ),
        "ko": (
            "시각 점수",
            "시각 점수가 원본 이미지와 손상된 이미지 사이에서 비교하는 값: 대상 토큰의 원시 `logit`(참조 코드) "
            "또는 `logprob`. 기본값 logit.",
        ),
        "ja": (
            "視覚スコア",
            "視覚スコアが元画像と破損画像の間で比較する値：対象トークンの生の `logit`（参照実装）または `logprob`。"
            "デフォルトは logit。",
        ),
    },
    "tpo_detach_reward": {
        "en": ("Detach reward", _english_help("tpo_detach_reward")),
        "ru": (
            "Отсоединить награду",
            "Не пропускать градиенты через веса токенов политики; тогда проход политики по искажённому изображению "
            "выполняется без графа, что дешевле. По умолчанию выключено.",
        ),
        "zh": (
            "分离奖励梯度",
            "不通过策略模型的 token 权重回传梯度；此时策略模型对破坏图像的前向计算无需计算图，开销更小。默认关闭。",
        ),
        "ko": (
            "보상 그래디언트 분리",
            "정책 모델의 토큰 가중치를 통한 그래디언트를 차단합니다. 손상된 이미지에 대한 정책 모델의 순전파가 "
            "그래프 없이 실행되어 비용이 줄어듭니다. 기본값 false.",
        ),
        "ja": (
            "報酬の勾配を切り離す",
            "ポリシーのトークン重みを通る勾配を止めます。破損画像に対するポリシーの順伝播は計算グラフなしで実行され、"
            "コストが下がります。デフォルトは false。",
        ),
    },
    "tpo_weighting": {
        "en": ("Token weighting", _english_help("tpo_weighting")),
        "ru": (
            "Взвешивание токенов",
            "Как веса токенов входят в оценку ответа: `log_additive`, сумма [log p + log c] (как в статье), или "
            "`multiplicative`, сумма c * log p с отсоединёнными весами политики, применёнными и к эталонной модели "
            "(веса масштабируют градиент каждого токена). По умолчанию log_additive.",
        ),
        "zh": (
            "token 加权方式",
            "token 权重进入回答得分的方式：`log_additive`，即 Σ[log p + log c]（论文做法）；或 `multiplicative`，"
            "即 Σ c·log p，策略模型的权重不回传梯度并同样作用于参考模型（权重缩放每个 token 的梯度）。"
            "默认 log_additive。",
        ),
        "ko": (
            "토큰 가중 방식",
            "토큰 가중치가 응답 점수에 들어가는 방식: `log_additive`, Σ[log p + log c](논문 방식), 또는 "
            "`multiplicative`, Σ c·log p(정책의 가중치는 그래디언트 없이 참조 모델에도 적용되어 각 토큰의 "
            "그래디언트를 조절). 기본값 log_additive.",
        ),
        "ja": (
            "トークンの重み付け",
            "トークン重みが応答スコアに入る方法：`log_additive`、Σ[log p + log c]（論文の方式）、または "
            "`multiplicative`、Σ c·log p（ポリシーの重みは勾配を流さず参照モデルにも適用され、各トークンの勾配を"
            "スケールする）。デフォルトは log_additive。",
        ),
    },
    "tpo_weight_clip": {
        "en": ("Weight-change bound", _english_help("tpo_weight_clip")),
        "ru": (
            "Предел изменения весов",
            "Защита от разгона TPO: ограничивает log c^theta - log c^ref каждого токена величиной ±это значение, "
            "чтобы политика не получала награду за дальнейшее раздувание визуальных оценок (только log_additive); "
            "число >= 0, 0 отключает. По умолчанию 0.",
        ),
        "zh": (
            "权重变化上限",
            "防止 TPO 失控：把每个 token 的 log c^theta - log c^ref 限制在 ±该值之内，策略不再因继续放大视觉分数而"
            "获得奖励（仅 log_additive）；取值 >= 0，0 表示关闭。默认 0。",
        ),
        "ko": (
            "가중치 변화 한계",
            "TPO 폭주 방지: 각 토큰의 log c^theta - log c^ref 를 ±이 값으로 제한하여, 정책이 시각 점수를 더 "
            "부풀려도 보상받지 않게 합니다(log_additive 전용). 0 이상의 수, 0 은 끔. 기본값 0.",
        ),
        "ja": (
            "重み変化の上限",
            "TPO の暴走対策：各トークンの log c^theta - log c^ref を ±この値に制限し、ポリシーが視覚スコアを"
            "さらに膨らませても報酬を得ないようにする（log_additive のみ）。0 以上の数、0 で無効。デフォルト 0。",
        ),
    },
    "tpo_conditional_weight": {
        "en": ("Conditional preference weight", _english_help("tpo_conditional_weight")),
        "ru": (
            "Вес условного предпочтения",
            "Вес условного предпочтения по изображению из mDPO: предпочтительный ответ при исходном изображении "
            "предпочитается тому же ответу при искажённом изображении. Число >= 0, 0 отключает; нужен "
            "`pref_loss: sigmoid`. По умолчанию 0.",
        ),
        "zh": (
            "条件偏好权重",
            "mDPO 的条件图像偏好项权重：在原图条件下的优选回答优于同一回答在损坏图像条件下的情形。取值 >= 0，"
            "0 表示关闭；需要 `pref_loss: sigmoid`。默认 0。",
        ),
        "ko": (
            "조건부 선호 가중치",
            "mDPO의 조건부 이미지 선호 항 가중치: 원본 이미지에서의 선호 응답을 손상된 이미지에서의 같은 응답보다 "
            "선호합니다. 0 이상의 수, 0 은 끔. `pref_loss: sigmoid` 필요. 기본값 0.",
        ),
        "ja": (
            "条件付き選好の重み",
            "mDPO の条件付き画像選好項の重み：元画像での選好応答を、破損画像での同じ応答より選好する。"
            "0 以上の数、0 で無効。`pref_loss: sigmoid` が必要。デフォルト 0。",
        ),
    },
    "tpo_anchor_weight": {
        "en": ("Reward anchor weight", _english_help("tpo_anchor_weight")),
        "ru": (
            "Вес якоря награды",
            "Вес якоря награды из mDPO: удерживает награду предпочтительного ответа положительной. Число >= 0, "
            "0 отключает; нужен `pref_loss: sigmoid`. По умолчанию 0.",
        ),
        "zh": (
            "奖励锚定权重",
            "mDPO 的奖励锚定项权重：使优选回答的奖励保持为正。取值 >= 0，0 表示关闭；需要 `pref_loss: sigmoid`。"
            "默认 0。",
        ),
        "ko": (
            "보상 앵커 가중치",
            "mDPO의 보상 앵커 항 가중치: 선호 응답의 보상을 양수로 유지합니다. 0 이상의 수, 0 은 끔. "
            "`pref_loss: sigmoid` 필요. 기본값 0.",
        ),
        "ja": (
            "報酬アンカーの重み",
            "mDPO の報酬アンカー項の重み：選好応答の報酬を正に保つ。0 以上の数、0 で無効。`pref_loss: sigmoid` "
            "が必要。デフォルト 0。",
        ),
    },
    "tpo_noise_per": {
        "en": ("Noise drawn per", _english_help("tpo_noise_per")),
        "ru": (
            "Шум на",
            "Когда выбирается шум искажения: заново на каждом шаге (`step`, по seed, шагу и изображению) или один раз "
            "на пример (`sample`: одна фиксированная искажённая копия каждого изображения на весь запуск). "
            "По умолчанию step.",
        ),
        "zh": (
            "噪声抽取粒度",
            "破坏噪声何时抽取：每个 `step` 重新抽取（由 seed、步数与图像决定），或每个 `sample` 一次"
            "（整个训练中每张图像只有一份固定的破坏副本）。默认 step。",
        ),
        "ko": (
            "노이즈 추출 단위",
            "손상 노이즈를 언제 뽑는지: 매 `step`마다 새로(seed, 스텝, 이미지로 결정) 또는 `sample`마다 한 번"
            "(학습 전체에서 이미지마다 고정된 손상 사본 하나). 기본값 step.",
        ),
        "ja": (
            "ノイズの単位",
            "破損ノイズをいつ引くか：`step` ごとに新しく（seed・ステップ・画像で決まる）、または `sample` ごとに一度"
            "（学習全体で画像ごとに固定の破損コピー1つ）。デフォルトは step。",
        ),
    },
    "tpo_precompute_ref": {
        "en": ("Precompute reference scores", _english_help("tpo_precompute_ref")),
        "ru": (
            "Предвычислить оценки эталона",
            "Один раз до обучения вычислить оценки токенов эталонной модели для всех пар, сохранить их в OUTPUT_DIR "
            "и не запускать эталонную модель во время обучения; отдельная эталонная модель освобождается. Требует "
            "`tpo_noise_per: sample`. По умолчанию выключено.",
        ),
        "zh": (
            "预先计算参考分数",
            "训练前一次性计算所有样本对的参考模型 token 分数并保存到 OUTPUT_DIR，训练中不再运行参考模型；"
            "单独的参考模型会被释放。需要 `tpo_noise_per: sample`。默认关闭。",
        ),
        "ko": (
            "참조 점수 사전 계산",
            "학습 전에 모든 쌍의 참조 모델 토큰 점수를 한 번 계산해 OUTPUT_DIR에 저장하고 학습 중에는 참조 모델을 "
            "실행하지 않습니다. 별도의 참조 모델은 해제됩니다. `tpo_noise_per: sample` 필요. 기본값 false.",
        ),
        "ja": (
            "参照スコアの事前計算",
            "学習前にすべてのペアの参照モデルのトークンスコアを一度だけ計算して OUTPUT_DIR に保存し、"
            "学習中は参照モデルを実行しません。別の参照モデルは解放されます。`tpo_noise_per: sample` が必要。"
            "デフォルトは false。",
        ),
    },
    "tpo_allow_changed_settings": {
        "en": ("Allow changed settings on resume", _english_help("tpo_allow_changed_settings")),
        "ru": (
            "Разрешить изменённые настройки при возобновлении",
            "Возобновить обучение с контрольной точки, даже если настройки, задающие целевую функцию (ключи tpo_*, "
            "pref_beta, pref_loss, pref_ftx, dpo_label_smoothing, ref_model, ref_model_adapters, seed), отличаются "
            "от тех, с которыми она обучалась; изменения записываются в журнал. Иначе такое возобновление "
            "отклоняется. По умолчанию выключено.",
        ),
        "zh": (
            "恢复训练时允许更改设置",
            "即使决定训练目标的设置（tpo_* 参数、pref_beta、pref_loss、pref_ftx、dpo_label_smoothing、ref_model、"
            "ref_model_adapters、seed）与检查点训练时不同，也从该检查点恢复训练，并在日志中记录这些更改；否则拒绝恢复。"
            "默认关闭。",
        ),
        "ko": (
            "재개 시 설정 변경 허용",
            "목적 함수를 정하는 설정(tpo_* 키, pref_beta, pref_loss, pref_ftx, dpo_label_smoothing, ref_model, "
            "ref_model_adapters, seed)이 체크포인트 학습 때와 달라도 체크포인트에서 학습을 재개하고 변경 사항을 "
            "로그에 남깁니다. 그렇지 않으면 재개를 거부합니다. 기본값 false.",
        ),
        "ja": (
            "再開時の設定変更を許可",
            "目的関数を決める設定（tpo_* キー、pref_beta、pref_loss、pref_ftx、dpo_label_smoothing、ref_model、"
            "ref_model_adapters、seed）がチェックポイントの学習時と異なっていても再開し、変更をログに記録します。"
            "そうでなければ再開を拒否します。デフォルトは false。",
        ),
    },
    "tpo_log_tokens": {
        "en": ("Log token weights of N pairs", _english_help("tpo_log_tokens")),
        "ru": (
            "Журнал весов токенов N пар",
            "Число фиксированных обучающих пар (первые N), для которых визуальные оценки s и веса c каждого токена "
            "дописываются в OUTPUT_DIR/tpo_tokens.jsonl на каждом шаге журналирования, целое число >= 0; 0 "
            "выключает и ничего не стоит. `tpo-plugin inspect --history OUTPUT_DIR` показывает их изменение. "
            "По умолчанию 0.",
        ),
        "zh": (
            "记录 N 个样本对的 token 权重",
            "在每个日志步将固定训练样本对（前 N 个）中每个 token 的视觉分数 s 和权重 c 追加写入 "
            "OUTPUT_DIR/tpo_tokens.jsonl，取值 >= 0 的整数；0 表示关闭且没有开销。"
            "`tpo-plugin inspect --history OUTPUT_DIR` 展示它们的变化。默认 0。",
        ),
        "ko": (
            "N개 쌍의 토큰 가중치 기록",
            "로깅 단계마다 고정된 학습 쌍(처음 N개)의 토큰별 시각 점수 s와 가중치 c를 OUTPUT_DIR/tpo_tokens.jsonl에 "
            "추가합니다. 0 이상의 정수이며 0은 끄기(비용 없음)입니다. `tpo-plugin inspect --history OUTPUT_DIR`로 "
            "변화를 볼 수 있습니다. 기본값 0.",
        ),
        "ja": (
            "N 組のトークン重みを記録",
            "ログ出力ステップごとに、固定した学習ペア（最初の N 組）のトークンごとの視覚スコア s と重み c を "
            "OUTPUT_DIR/tpo_tokens.jsonl に追記します（0 以上の整数、0 はオフでコストなし）。"
            "`tpo-plugin inspect --history OUTPUT_DIR` で推移を表示します。デフォルトは 0。",
        ),
    },
}

# tpo_info: a note at the top of the panel (a Markdown element, so its text is its "value").
_INFO = {
    "en": "β (`pref_beta`), the SFT loss weight (`pref_ftx`) and the loss type (`pref_loss`: sigmoid, hinge or ipo) "
    "of the **RLHF configurations** apply to TPO as they do to DPO. Choose a ranking dataset with images or videos "
    "(videos with the qwen2_vl and qwen3_vl templates) and the vision-language template of the model.",
    "ru": "β (`pref_beta`), вес потерь SFT (`pref_ftx`) и тип функции потерь (`pref_loss`: sigmoid, hinge или ipo) "
    "из **конфигураций RLHF** действуют для TPO так же, как для DPO. Выберите ранжированный набор данных с "
    "изображениями или видео (видео — с шаблонами qwen2_vl и qwen3_vl) и мультимодальный шаблон модели.",
    "zh": "**RLHF 参数设置**中的 β（`pref_beta`）、SFT 损失权重（`pref_ftx`）和损失函数类型（`pref_loss`：sigmoid、"
    "hinge 或 ipo）对 TPO 的作用与对 DPO 相同。请选择带图像或视频的偏好（ranking）数据集（视频需使用 "
    "qwen2_vl 或 qwen3_vl 模板）和模型对应的多模态模板。",
    "ko": "**RLHF 구성**의 β(`pref_beta`), SFT 손실 가중치(`pref_ftx`), 손실 함수 유형(`pref_loss`: sigmoid, hinge "
    "또는 ipo)은 DPO와 마찬가지로 TPO에도 적용됩니다. 이미지 또는 동영상이 있는 랭킹 데이터셋(동영상은 "
    "qwen2_vl, qwen3_vl 템플릿)과 모델의 멀티모달 템플릿을 선택하세요.",
    "ja": "**RLHF 設定**の β（`pref_beta`）、SFT 損失の重み（`pref_ftx`）、損失関数の種類（`pref_loss`：sigmoid、"
    "hinge、ipo）は DPO と同様に TPO にも適用されます。画像または動画付きのランキングデータセット（動画は"
    "qwen2_vl と qwen3_vl テンプレート）と、モデルのマルチモーダルテンプレートを選んでください。",
}


def _locale_entry(texts: tuple[str, ...]) -> dict[str, str]:
    return dict(zip(("label", "info"), texts, strict=False))


# Entries for LLaMA-Factory's ``webui.locales.LOCALES``: element name -> language -> component properties.
LOCALES: dict[str, dict[str, dict[str, str]]] = {
    name: {lang: _locale_entry(texts[lang]) for lang in LANGUAGES} for name, texts in _TEXTS.items()
}
LOCALES["tpo_info"] = {lang: {"value": _INFO[lang]} for lang in LANGUAGES}
