"""Fast decoding on the CPU: gptkit's C kernels (`kernels.c`, compiled by `build`), the layers that
call them (`linear`: fp32, `quantize`: int8 / int4) and a whole decoding step in one call (`decode`).

The sampler does not import this package: `gptkit.generate.inference` chooses a model's decoder and
hands it to the sampler behind the `gptkit.generate.decoder.Decoder` protocol.
"""
