"""Why did the fused model say that? Attributions per modality and inside each one.

For each row: the predicted class and its probability; each modality's contribution by masking it through the
present-mask and by its share of the Integrated Gradients attribution over the encoders' outputs; inside a
text, Integrated Gradients on the input embeddings (sub-word tokens merged back into words, signed); inside an
image, audio or other file column, Grad-CAM over the encoder's last feature map (CNNs, log-mel CNNs) or its
last layer's tokens (ViT-like, wav2vec2-like); for tabular columns, Integrated Gradients per column token; the
cross-attention maps and the gates of those fusions. For the table: mean contributions, the words most
attributed per class, the rows where the modalities disagree most, and activation statistics of a few rows.

Attribution methods are captum's (IntegratedGradients, LayerIntegratedGradients, LayerGradCam); the rest is
glue and drawing (:mod:`mmtune.explain.page`)."""
from .explainer import Explainer, Explanation, explain_worst
from .reference import reference_outputs
from .summary import summarise

__all__ = ["Explainer", "Explanation", "explain_worst", "reference_outputs", "summarise"]
