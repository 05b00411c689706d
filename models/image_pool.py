"""History of generated images (Shrivastava et al. 2017; CycleGAN's pool of 50).

The pool is training state: the caller keeps it in `state`, and checkpoints it through
`state_dict()` / `load_state_dict()`. Randomness comes from torch's global generator, so a loop
that checkpoints torch's RNG state resumes the pool exactly.
"""

import torch


class ImagePool:
    """Return a batch in which each image is, with probability 0.5 once the pool is full, swapped
    for a random older one (which the new image replaces in the pool)."""

    def __init__(self, size=50):
        self.size = size
        self.images = []

    def __len__(self):
        return len(self.images)

    def query(self, images):
        if self.size <= 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand(()).item() > 0.5:
                i = int(torch.randint(0, self.size, ()).item())
                out.append(self.images[i].clone())
                self.images[i] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self):
        stacked = torch.cat(self.images, 0).cpu() if self.images else torch.empty(0)
        return {"size": self.size, "images": stacked}

    def load_state_dict(self, state, device=None):
        self.size = int(state["size"])
        images = state["images"]
        if device is not None:
            images = images.to(device)
        self.images = [img.unsqueeze(0) for img in images] if images.numel() else []
