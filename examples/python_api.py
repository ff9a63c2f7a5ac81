"""The Python API in ten lines: ImageNet MobileNetV2 fine-tuned on Animal-MNIST, the head first, then the backbone
four layer groups at a time, each group at a lower learning rate than the one above it.

Run from the repository root after ``make setup`` (which copies the weights file to ``.cache/weights/``)::

    python examples/python_api.py

It trains for 3 epochs on 2,100 images at 64 px (a few minutes on a CPU) and prints the validation accuracy.
"""

import lightning.pytorch as pl

from lt_finetune import TransferModule
from lt_finetune.callbacks import GradualUnfreeze, LayerwiseLR
from lt_finetune.data import AnimalMNISTDataModule

# --8<-- [start:api]
model = TransferModule(
    "torchvision/mobilenet_v2", num_classes=10, pretrained=".cache/weights/mobilenet_v2-b0353104.pth"
)
data = AnimalMNISTDataModule(image_size=64, train_per_class=210)
callbacks = [GradualUnfreeze(every_n_epochs=1, groups_per_stage=4, warmup_steps=20), LayerwiseLR(decay=0.7)]
trainer = pl.Trainer(max_epochs=3, callbacks=callbacks)
trainer.fit(model, data)
print(f"validation accuracy: {trainer.callback_metrics['val/acc']:.3f}")
# --8<-- [end:api]
