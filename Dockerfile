# syntax=docker/dockerfile:1
# One image for the API and the worker (the command picks the role); the `emulator` target adds the
# dev dependencies to run the KMS emulator for local use.
FROM node:20-bookworm-slim AS deps
WORKDIR /app
# pkcs11js (the hsm-luna tier) is a native addon built by node-gyp.
RUN apt-get update && apt-get install -y --no-install-recommends python3 make g++ && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund

FROM deps AS build
COPY tsconfig.json tsconfig.build.json ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
RUN npm run build && npm prune --omit=dev

FROM deps AS emulator
COPY tsconfig.json ./
COPY test/kms-emulator ./test/kms-emulator
USER node
EXPOSE 4599
CMD ["npx", "tsx", "test/kms-emulator/main.ts"]

FROM node:20-bookworm-slim AS runtime
ENV NODE_ENV=production
WORKDIR /app
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY package.json ./
# An HSM's PKCS#11 library (e.g. Luna's libCryptoki2_64.so) is mounted into this image and listed in HSM_LIBRARIES.
USER node
EXPOSE 8080
CMD ["node", "dist/api/main.js"]
