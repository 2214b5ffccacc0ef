"""Stage code of the ResNet8 quantization pipeline; each module is one DVC stage."""
