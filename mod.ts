/**
 * Distillery: a declarative pipeline runner that distills a pretrained Transformer into a hybrid Mamba model.
 *
 * @module
 */
export {};
