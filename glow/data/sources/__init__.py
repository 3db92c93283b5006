"""Readers of each data set in its distributed format, one module per family: CelebA, SVHN,
CIFAR-10/100, MNIST / Fashion-MNIST, any image folder, the embedded demo sets and Gaussian
random fields. Each returns one `glow.data.shards.Source` per split."""
